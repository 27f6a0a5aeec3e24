//! Turns the trainer's step and epoch reports into an overall percentage and an ETA.
//!
//! Each stage gets a share of the run from where the time goes on a CPU with the default
//! config (the frozen pass about half, fine-tuning most of the rest, the warm-up little).
//! The ETA extrapolates the time spent so far over the share done.

use std::time::Instant;

use crate::db::epochs::Progress;
use crate::ml::config::{TrainConfig, When};

pub(crate) struct Tracker {
    started: Instant,
    /// (stage, share) in run order; shares sum to 1.
    shares: Vec<(&'static str, f64)>,
    /// Share of the run done before the current stage.
    done_before: f64,
    current: Option<&'static str>,
    epochs: Vec<(&'static str, usize)>,
    pub(crate) last: Progress,
    /// Share done when this attempt started (a resumed run starts past 0).
    base: f64,
    stage_started: Instant,
}

fn stage_name(stage: &str) -> &'static str {
    match stage {
        "frozen_pass" => "frozen_pass",
        "warmup" => "warmup",
        "finetune" => "finetune",
        _ => "baseline",
    }
}

impl Tracker {
    /// `resume_at`: the phase this attempt starts with, when earlier phases are already done.
    pub(crate) fn new(config: &TrainConfig, resume_at: Option<&str>) -> Self {
        let mut shares = Vec::new();
        // Whether an automatic fine-tune runs is only known once the data is counted; its
        // share is planned, and skipped over if it does not run.
        let finetune = config.finetune.enabled != When::Off;
        shares.push(("frozen_pass", 50.0));
        if config.warmup.enabled {
            shares.push(("warmup", 5.0));
        }
        if finetune {
            shares.push(("finetune", 45.0));
        }
        if config.baseline.enabled {
            shares.push(("baseline", 50.0));
        }
        let total: f64 = shares.iter().map(|s| s.1).sum();
        for s in &mut shares {
            s.1 /= total;
        }
        let mut base = 0.0;
        if let Some(phase) = resume_at {
            // The warm-up share is done; the frozen pass is redone.
            base = shares
                .iter()
                .filter(|(s, _)| *s == "warmup" && phase != "warmup")
                .map(|s| s.1)
                .sum();
        }
        Self {
            started: Instant::now(),
            shares,
            done_before: base,
            current: None,
            epochs: vec![
                ("warmup", 1),
                ("finetune", config.finetune.epochs),
                ("baseline", config.baseline.epochs),
            ],
            last: Progress::default(),
            base,
            stage_started: Instant::now(),
        }
    }

    fn share(&self, stage: &str) -> f64 {
        self.shares
            .iter()
            .find(|(s, _)| *s == stage)
            .map_or(0.0, |s| s.1)
    }

    fn enter(&mut self, stage: &'static str) {
        if self.current == Some(stage) {
            return;
        }
        if let Some(prev) = self.current {
            self.done_before += self.share(prev);
        }
        self.current = Some(stage);
        self.stage_started = Instant::now();
        self.last.epoch = None;
        self.last.epochs_total = self.epochs_total(stage).map(|n| n as i64);
    }

    fn epochs_total(&self, stage: &str) -> Option<usize> {
        self.epochs.iter().find(|(s, _)| *s == stage).map(|e| e.1)
    }

    fn update(&mut self, stage: &'static str, within: f64) {
        let percent = (self.done_before + self.share(stage) * within.clamp(0.0, 1.0)).min(1.0);
        let progressed = percent - self.base;
        let elapsed = self.started.elapsed().as_secs_f64();
        self.last.percent = percent * 100.0;
        self.last.eta_seconds = (progressed > 0.01).then(|| elapsed * (1.0 - percent) / progressed);
        self.last.phase = Some(stage.to_string());
        self.last.stage = Some(stage.to_string());
    }

    /// Steps per second of the current stage, given `done` steps of its current epoch (or
    /// of the stage when it has no epochs).
    pub(crate) fn rate(&self, done: usize) -> Option<f64> {
        let elapsed = self.stage_started.elapsed().as_secs_f64();
        let per_epoch = self.last.steps_total.unwrap_or(0).max(0) as f64;
        let steps = self.last.epoch.unwrap_or(0) as f64 * per_epoch + done as f64;
        (elapsed > 0.5).then(|| steps / elapsed)
    }

    /// A step of `stage` finished.
    pub(crate) fn step(&mut self, stage: &str, done: usize, total: usize) {
        let stage = stage_name(stage);
        self.enter(stage);
        let fraction = done as f64 / total.max(1) as f64;
        let within = match self.epochs_total(stage) {
            Some(n) => (self.last.epoch.unwrap_or(0) as f64 + fraction) / n.max(1) as f64,
            None => fraction,
        };
        self.last.step = Some(done as i64);
        self.last.steps_total = Some(total as i64);
        self.update(stage, within);
    }

    /// Epoch `epoch` (1-based) of `phase` finished.
    pub(crate) fn epoch(&mut self, phase: &str, epoch: usize) {
        let stage = stage_name(phase);
        self.enter(stage);
        let total = self.epochs_total(stage).unwrap_or(epoch).max(1);
        self.last.epoch = Some(epoch as i64);
        self.last.epochs_total = Some(total as i64);
        self.update(stage, epoch as f64 / total as f64);
    }

    /// A phase finished (possibly early).
    pub(crate) fn phase_done(&mut self, phase: &str) {
        let stage = stage_name(phase);
        self.enter(stage);
        self.update(stage, 1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_grows_through_the_stages() {
        let config = TrainConfig::default();
        let mut t = Tracker::new(&config, None);
        t.step("frozen_pass", 50, 100);
        assert!((t.last.percent - 25.0).abs() < 1e-9, "{}", t.last.percent);
        t.step("frozen_pass", 100, 100);
        // The head's progress is its walk along the penalty grid.
        t.step("warmup", 3, 11);
        let mid = t.last.percent;
        assert!(mid > 50.0 && mid < 55.0, "{mid}");
        t.phase_done("warmup");
        assert!((t.last.percent - 55.0).abs() < 1e-9);
        t.step("finetune", 10, 10);
        t.epoch("finetune", 4);
        assert!((t.last.percent - 100.0).abs() < 1e-9);
        assert!(t.last.eta_seconds.is_some_and(|e| e < 1.0));
    }
}
