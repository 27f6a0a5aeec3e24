//! Turns the trainer's step and epoch reports into an overall percentage and an ETA.
//!
//! Each stage gets a share of the run from where the time goes on a CPU with the default
//! config (the frozen pass about half, fine-tuning most of the rest, the warm-up little).
//! The ETA extrapolates the time spent so far over the share done.

use std::time::Instant;

use crate::db::epochs::Progress;
use crate::ml::config::{TrainConfig, When};
use crate::ml::events::{Phase, Stage};

pub(crate) struct Tracker {
    started: Instant,
    /// (stage, share) in run order; shares sum to 1.
    shares: Vec<(Stage, f64)>,
    /// Share of the run done before the current stage.
    done_before: f64,
    current: Option<Stage>,
    epochs: Vec<(Stage, usize)>,
    pub(crate) last: Progress,
    /// Share done when this attempt started (a resumed run starts past 0).
    base: f64,
    stage_started: Instant,
}

impl Tracker {
    /// `resume_at`: the phase this attempt starts with, when earlier phases are already done.
    pub(crate) fn new(config: &TrainConfig, resume_at: Option<Phase>) -> Self {
        let mut shares = Vec::new();
        // Whether an automatic fine-tune runs is only known once the data is counted; its
        // share is planned, and skipped over if it does not run.
        let finetune = config.finetune.enabled != When::Off;
        shares.push((Stage::FrozenPass, 50.0));
        if config.warmup.enabled {
            shares.push((Stage::Phase(Phase::Warmup), 5.0));
        }
        if finetune {
            shares.push((Stage::Phase(Phase::Finetune), 45.0));
        }
        if config.baseline.enabled {
            shares.push((Stage::Phase(Phase::Baseline), 50.0));
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
                .filter(|(s, _)| *s == Stage::Phase(Phase::Warmup) && phase != Phase::Warmup)
                .map(|s| s.1)
                .sum();
        }
        Self {
            started: Instant::now(),
            shares,
            done_before: base,
            current: None,
            epochs: vec![
                (Stage::Phase(Phase::Warmup), 1),
                (Stage::Phase(Phase::Finetune), config.finetune.epochs),
                (Stage::Phase(Phase::Baseline), config.baseline.epochs),
            ],
            last: Progress::default(),
            base,
            stage_started: Instant::now(),
        }
    }

    fn share(&self, stage: Stage) -> f64 {
        self.shares
            .iter()
            .find(|(s, _)| *s == stage)
            .map_or(0.0, |s| s.1)
    }

    fn enter(&mut self, stage: Stage) {
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

    fn epochs_total(&self, stage: Stage) -> Option<usize> {
        self.epochs.iter().find(|(s, _)| *s == stage).map(|e| e.1)
    }

    fn update(&mut self, stage: Stage, within: f64) {
        let percent = (self.done_before + self.share(stage) * within.clamp(0.0, 1.0)).min(1.0);
        let progressed = percent - self.base;
        let elapsed = self.started.elapsed().as_secs_f64();
        self.last.percent = percent * 100.0;
        self.last.eta_seconds = (progressed > 0.01).then(|| elapsed * (1.0 - percent) / progressed);
        self.last.stage = Some(stage);
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
    pub(crate) fn step(&mut self, stage: Stage, done: usize, total: usize) {
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
    pub(crate) fn epoch(&mut self, phase: Phase, epoch: usize) {
        let stage = Stage::Phase(phase);
        self.enter(stage);
        let total = self.epochs_total(stage).unwrap_or(epoch).max(1);
        self.last.epoch = Some(epoch as i64);
        self.last.epochs_total = Some(total as i64);
        self.update(stage, epoch as f64 / total as f64);
    }

    /// A phase finished (possibly early).
    pub(crate) fn phase_done(&mut self, phase: Phase) {
        let stage = Stage::Phase(phase);
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
        t.step(Stage::FrozenPass, 50, 100);
        assert!((t.last.percent - 25.0).abs() < 1e-9, "{}", t.last.percent);
        t.step(Stage::FrozenPass, 100, 100);
        // The head's progress is its walk along the penalty grid.
        t.step(Stage::Phase(Phase::Warmup), 3, 11);
        let mid = t.last.percent;
        assert!(mid > 50.0 && mid < 55.0, "{mid}");
        t.phase_done(Phase::Warmup);
        assert!((t.last.percent - 55.0).abs() < 1e-9);
        t.step(Stage::Phase(Phase::Finetune), 10, 10);
        t.epoch(Phase::Finetune, 4);
        assert!((t.last.percent - 100.0).abs() < 1e-9);
        assert!(t.last.eta_seconds.is_some_and(|e| e < 1.0));
    }
}
