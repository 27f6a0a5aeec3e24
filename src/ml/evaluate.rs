//! Evaluation on the validation set: confusion matrix, per-class precision/recall/F1, the
//! misclassified files, and temperature scaling with the expected calibration error (ECE)
//! before and after. Plain Rust over logits: nothing here needs a tensor backend.

use serde::{Deserialize, Serialize};

/// Per-class scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClassReport {
    pub class: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

/// A validation image the model got wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Misclassified {
    pub path: String,
    pub true_label: String,
    pub predicted: String,
    /// Calibrated probabilities per class, in class order.
    pub probabilities: Vec<f32>,
}

/// Temperature scaling fitted on the validation logits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Calibration {
    pub temperature: f64,
    pub ece_before: f64,
    pub ece_after: f64,
    pub nll_before: f64,
    pub nll_after: f64,
}

/// Everything `evaluation.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Evaluation {
    pub classes: Vec<String>,
    pub accuracy: f64,
    /// `confusion[true][predicted]`
    pub confusion: Vec<Vec<usize>>,
    pub per_class: Vec<ClassReport>,
    pub calibration: Calibration,
    /// The most confident mistakes, at most [`MAX_MISCLASSIFIED`] (the confusion matrix
    /// counts every one).
    pub misclassified: Vec<Misclassified>,
    /// How these figures were measured and what the run decided (absent in evaluations
    /// stored before runs recorded it).
    #[serde(default)]
    pub training: Option<super::plan::TrainingReport>,
    /// Likely label errors, near-duplicates and outliers (absent before audits existed).
    #[serde(default)]
    pub audit: Option<super::audit::Audit>,
    /// How "unknown" answers are decided (absent before they existed).
    #[serde(default)]
    pub ood: Option<super::ood::OodSummary>,
}

/// Softmax of `logits / temperature`.
pub fn softmax(logits: &[f32], temperature: f64) -> Vec<f32> {
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / temperature).collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = scaled.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

/// Index of the largest value (the first one on ties).
pub fn argmax<T: PartialOrd>(p: &[T]) -> usize {
    p.iter()
        .enumerate()
        .fold(0, |best, (i, v)| if *v > p[best] { i } else { best })
}

/// Mean negative log-likelihood at a temperature.
pub fn nll(logits: &[Vec<f32>], labels: &[usize], temperature: f64) -> f64 {
    let total: f64 = logits
        .iter()
        .zip(labels)
        .map(|(l, &y)| -(softmax(l, temperature)[y] as f64).max(1e-12).ln())
        .sum();
    total / logits.len().max(1) as f64
}

/// Expected calibration error over 15 equal-width confidence bins.
pub fn ece(logits: &[Vec<f32>], labels: &[usize], temperature: f64) -> f64 {
    const BINS: usize = 15;
    let mut conf = [0.0f64; BINS];
    let mut acc = [0.0f64; BINS];
    let mut count = [0usize; BINS];
    for (l, &y) in logits.iter().zip(labels) {
        let p = softmax(l, temperature);
        let k = argmax(&p);
        let c = p[k] as f64;
        let b = ((c * BINS as f64) as usize).min(BINS - 1);
        conf[b] += c;
        acc[b] += f64::from(u8::from(k == y));
        count[b] += 1;
    }
    let n = logits.len().max(1) as f64;
    (0..BINS)
        .filter(|&b| count[b] > 0)
        .map(|b| (acc[b] - conf[b]).abs() / n)
        .sum()
}

/// Fewer validation images than this leave the temperature at 1: on a handful of perfectly
/// separated images the NLL keeps falling as T goes to 0, which would make the model
/// wildly overconfident rather than calibrated.
pub const MIN_CALIBRATION_IMAGES: usize = 30;

/// With fewer validation errors than this, the temperature may soften but never sharpen:
/// when (almost) every validation image is right, the NLL keeps falling as T shrinks, and
/// the fit would only be measuring how separable this one validation set happens to be.
pub const MIN_ERRORS_TO_SHARPEN: usize = 3;

/// The temperature minimising validation NLL, by golden-section search on log T in [1/4, 10]
/// (in [1, 10] when the validation set has too few errors to justify sharpening).
pub fn fit_temperature(logits: &[Vec<f32>], labels: &[usize]) -> f64 {
    if logits.len() < MIN_CALIBRATION_IMAGES {
        return 1.0;
    }
    let errors = logits
        .iter()
        .zip(labels)
        .filter(|(l, y)| argmax(l) != **y)
        .count();
    let low: f64 = if errors < MIN_ERRORS_TO_SHARPEN {
        1.0
    } else {
        0.25
    };
    let f = |log_t: f64| nll(logits, labels, log_t.exp());
    let (mut a, mut b) = (low.ln(), (10.0f64).ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (b - g * (b - a), a + g * (b - a));
    for _ in 0..60 {
        if f(c) < f(d) {
            b = d;
        } else {
            a = c;
        }
        c = b - g * (b - a);
        d = a + g * (b - a);
    }
    ((a + b) / 2.0).exp()
}

/// Builds the full evaluation from validation logits.
pub fn evaluate(
    classes: &[String],
    logits: &[Vec<f32>],
    labels: &[usize],
    paths: &[String],
) -> Evaluation {
    let n = classes.len();
    let temperature = fit_temperature(logits, labels);
    let mut confusion = vec![vec![0usize; n]; n];
    let mut misclassified = Vec::new();
    for ((l, &y), path) in logits.iter().zip(labels).zip(paths) {
        let p = softmax(l, temperature);
        let k = argmax(&p);
        confusion[y][k] += 1;
        if k != y {
            misclassified.push(Misclassified {
                path: path.clone(),
                true_label: classes[y].clone(),
                predicted: classes[k].clone(),
                probabilities: p,
            });
        }
    }
    let correct: usize = (0..n).map(|i| confusion[i][i]).sum();
    let per_class = (0..n)
        .map(|c| {
            let tp = confusion[c][c] as f64;
            let predicted: usize = (0..n).map(|r| confusion[r][c]).sum();
            let support: usize = confusion[c].iter().sum();
            let precision = if predicted > 0 {
                tp / predicted as f64
            } else {
                0.0
            };
            let recall = if support > 0 {
                tp / support as f64
            } else {
                0.0
            };
            let f1 = if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            };
            ClassReport {
                class: classes[c].clone(),
                precision,
                recall,
                f1,
                support,
            }
        })
        .collect();
    Evaluation {
        classes: classes.to_vec(),
        accuracy: correct as f64 / labels.len().max(1) as f64,
        confusion,
        per_class,
        calibration: Calibration {
            temperature,
            ece_before: ece(logits, labels, 1.0),
            ece_after: ece(logits, labels, temperature),
            nll_before: nll(logits, labels, 1.0),
            nll_after: nll(logits, labels, temperature),
        },
        misclassified: most_confident_mistakes(misclassified),
        training: None,
        audit: None,
        ood: None,
    }
}

/// Mistakes an evaluation keeps: the list is for people to look at, and its size must not
/// grow with the dataset (the confusion matrix counts them all).
pub const MAX_MISCLASSIFIED: usize = 500;

/// The [`MAX_MISCLASSIFIED`] mistakes made with the most confidence, most confident first.
fn most_confident_mistakes(mut all: Vec<Misclassified>) -> Vec<Misclassified> {
    let confidence = |m: &Misclassified| m.probabilities.iter().copied().fold(0.0, f32::max);
    all.sort_by(|a, b| confidence(b).total_cmp(&confidence(a)));
    all.truncate(MAX_MISCLASSIFIED);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_mistakes_are_capped_most_confident_first() {
        let mistake = |p: f32| Misclassified {
            path: format!("{p}"),
            true_label: "a".into(),
            predicted: "b".into(),
            probabilities: vec![1.0 - p, p],
        };
        let all: Vec<_> = (0..MAX_MISCLASSIFIED + 100)
            .map(|i| mistake(0.5 + 0.4 * i as f32 / (MAX_MISCLASSIFIED + 100) as f32))
            .collect();
        let kept = most_confident_mistakes(all);
        assert_eq!(kept.len(), MAX_MISCLASSIFIED);
        assert!(
            kept.windows(2)
                .all(|w| w[0].probabilities[1] >= w[1].probabilities[1])
        );
        assert!(
            kept[0].probabilities[1] > 0.89,
            "the most confident mistake leads"
        );
    }

    #[test]
    fn confusion_and_scores() {
        let classes = vec!["cat".to_string(), "dog".to_string()];
        let logits = vec![
            vec![2.0, 0.0],
            vec![0.0, 3.0],
            vec![1.0, 0.0],
            vec![0.0, 1.0],
        ];
        let labels = vec![0, 1, 1, 1];
        let paths: Vec<String> = (0..4).map(|i| format!("f{i}.jpg")).collect();
        let e = evaluate(&classes, &logits, &labels, &paths);
        assert_eq!(e.confusion, vec![vec![1, 0], vec![1, 2]]);
        assert!((e.accuracy - 0.75).abs() < 1e-12);
        assert!((e.per_class[0].precision - 0.5).abs() < 1e-12);
        assert!((e.per_class[1].recall - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(e.misclassified.len(), 1);
        assert_eq!(e.misclassified[0].path, "f2.jpg");
        assert!(e.calibration.nll_after <= e.calibration.nll_before + 1e-9);
    }

    #[test]
    fn a_perfect_validation_set_never_sharpens() {
        let logits: Vec<Vec<f32>> = (0..60)
            .map(|i| {
                if i % 2 == 0 {
                    vec![1.0, 0.0]
                } else {
                    vec![0.0, 1.0]
                }
            })
            .collect();
        let labels: Vec<usize> = (0..60).map(|i| i % 2).collect();
        assert!((fit_temperature(&logits, &labels) - 1.0).abs() < 1e-3);
    }

    #[test]
    fn overconfident_logits_get_a_temperature_above_one() {
        // Right 70% of the time with confidence ~1: scaling must soften them.
        let logits: Vec<Vec<f32>> = (0..100).map(|_| vec![10.0, 0.0]).collect();
        let labels: Vec<usize> = (0..100).map(|i| usize::from(i % 10 >= 7)).collect();
        let t = fit_temperature(&logits, &labels);
        assert!(t > 2.0, "temperature {t}");
        assert!(ece(&logits, &labels, t) < ece(&logits, &labels, 1.0));
    }
}
