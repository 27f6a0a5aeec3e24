//! The audit on synthetic features with planted label errors, duplicates and outliers.
use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Three Gaussian classes in 64 dimensions, 30 photos each; photo 5 (class 0) is filed
/// under class 1, photo 40 is a jittered copy of photo 41 filed under class 2, and photo
/// 89 lies far from everything.
fn synthetic() -> (AuditRows, Vec<String>) {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let d = 64;
    let mut x = Vec::new();
    let mut labels = Vec::new();
    for i in 0..90 {
        let y = i / 30;
        let mut row: Vec<f32> = (0..d)
            .map(|j| if j == y { 4.0 } else { 0.0 } + rng.random_range(-1.0..1.0f32))
            .collect();
        if i % 10 == 9 && i != 89 {
            // A hard photo, halfway to the next class: real data has some.
            row[(y + 1) % 3] = 2.0;
            row[y] = 2.0;
        }
        if i == 89 {
            row.iter_mut().for_each(|v| *v = 0.0);
            row[d - 1] = 40.0;
        }
        x.extend(row);
        labels.push(y);
    }
    labels[5] = 1;
    let copy: Vec<f32> = x[41 * d..42 * d].iter().map(|v| v + 0.01).collect();
    x[40 * d..41 * d].copy_from_slice(&copy);
    labels[40] = 2;
    let rows = AuditRows {
        x,
        dim: d,
        labels,
        samples: (0..90).collect(),
        splits: (0..90)
            .map(|i| {
                if i % 5 == 0 {
                    Split::Validation
                } else {
                    Split::Train
                }
            })
            .collect(),
    };
    (rows, vec!["a".into(), "b".into(), "c".into()])
}

#[test]
fn finds_the_planted_label_error_duplicate_and_outlier() {
    let (rows, classes) = synthetic();
    let a = audit(&rows, &classes, &|s| format!("p{s}"), 1e-2, 1);
    let flagged: Vec<&str> = a
        .label_issues
        .iter()
        .map(|l| l.photo.path.as_str())
        .collect();
    assert!(flagged.contains(&"p5"), "{flagged:?}");
    let p5 = a
        .label_issues
        .iter()
        .find(|l| l.photo.path == "p5")
        .unwrap();
    assert_eq!((p5.photo.label.as_str(), p5.suggested.as_str()), ("b", "a"));
    assert!(p5.given_probability < 0.5, "{p5:?}");
    // Besides the planted errors, only the halfway photos may be flagged.
    assert!(
        flagged
            .iter()
            .all(|p| ["p5", "p40", "p89"].contains(p) || p.ends_with('9')),
        "few false alarms: {flagged:?}"
    );
    let first = &a.near_duplicates[0];
    assert_eq!(
        (first.a.path.as_str(), first.b.path.as_str()),
        ("p40", "p41")
    );
    assert_eq!(first.kind, PairKind::CrossClass);
    assert_eq!(a.counts.cross_class, 1, "{:?}", a.near_duplicates);
    assert_eq!(
        a.outliers.first().map(|o| o.photo.path.as_str()),
        Some("p89")
    );
    // Only the planted outlier and the lone halfway photos lie in empty space.
    assert!(
        a.outliers.iter().all(|o| o.photo.path.ends_with('9')),
        "{:?}",
        a.outliers
    );
}

#[test]
fn a_pair_across_the_split_is_leakage() {
    let (mut rows, classes) = synthetic();
    rows.labels[40] = rows.labels[41];
    rows.splits[40] = Split::Validation;
    rows.splits[41] = Split::Train;
    let a = audit(&rows, &classes, &|s| format!("p{s}"), 1e-2, 1);
    assert_eq!(a.near_duplicates[0].kind, PairKind::TrainVal);
    assert_eq!(a.counts.train_val, 1);
    assert_eq!(a.counts.cross_class, 0);
}

#[test]
fn robust_z_scores_the_far_value_only() {
    let z = robust_z(&[1.0, 1.1, 0.9, 1.05, 0.95, 5.0]);
    assert!(
        z[5] > OUTLIER_Z && z[..5].iter().all(|v| v.abs() < 2.0),
        "{z:?}"
    );
    assert_eq!(robust_z(&[2.0; 4]), vec![0.0; 4]);
}

#[test]
fn with_three_classes_the_suggestion_is_the_most_probable_other_class() {
    // Photos 0–9 labelled 0, 10–19 labelled 1, 20–29 labelled 2; photo 3 looks like class 2,
    // photo 12 like class 0.
    let mut probs = Vec::new();
    let mut labels = Vec::new();
    for i in 0..30 {
        let y = i / 10;
        let mut p = vec![0.05f32; 3];
        p[y] = 0.9;
        if i == 3 {
            p = vec![0.02, 0.05, 0.93];
        }
        if i == 12 {
            p = vec![0.85, 0.1, 0.05];
        }
        probs.push(p);
        labels.push(y);
    }
    let (flagged, t) = label_issues(&probs, &labels, 3);
    assert_eq!(flagged.len(), 2, "{flagged:?}");
    assert!(
        flagged.contains(&(3, 2)) && flagged.contains(&(12, 0)),
        "{flagged:?}"
    );
    assert!((t[0] - (9.0 * 0.9 + 0.02) / 10.0).abs() < 1e-6, "{t:?}");
}
