//! Folder-per-class layout of an archive: which class each file belongs to. A single wrapping
//! folder (`mydata/dog/...`) is unwrapped, and so is a `train/` level; `train/` and `val/`
//! folders with the same classes are merged, since transferd makes its own stratified split.

use std::collections::BTreeSet;

use super::IngestError;

/// Folder names that mean "a split", not "a class".
const SPLITS: [&str; 7] = [
    "train",
    "training",
    "val",
    "valid",
    "validation",
    "test",
    "testing",
];

/// The class of every file of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Per input path: its class, or `None` when it sits outside any class folder.
    pub classes: Vec<Option<String>>,
    pub warnings: Vec<String>,
}

fn is_split(name: &str) -> bool {
    SPLITS.contains(&name.to_ascii_lowercase().as_str())
}

/// Works out the classes of `paths` (entry names split into components, files only).
pub fn resolve(paths: &[Vec<&str>]) -> Result<Layout, IngestError> {
    if paths.is_empty() {
        return Err(IngestError::Layout(
            "the archive holds no files; expected one folder of images per class".into(),
        ));
    }
    // `skip[i]`: leading components of path i that are not part of class/file.
    let mut skip = 0usize;
    let mut warnings = Vec::new();
    let view = |skip: usize| -> Vec<&[&str]> {
        paths
            .iter()
            .map(|p| {
                if p.len() > skip {
                    &p[skip..]
                } else {
                    &p[p.len()..]
                }
            })
            .collect()
    };
    // Unwrap single wrapping folders while the files in folders all share one.
    loop {
        let v = view(skip);
        let tops: BTreeSet<&str> = v.iter().filter(|p| p.len() >= 2).map(|p| p[0]).collect();
        let deeper = v.iter().any(|p| p.len() >= 3);
        if tops.len() == 1 && deeper && !is_split(tops.iter().next().unwrap()) {
            skip += 1;
        } else {
            break;
        }
    }
    let v = view(skip);
    let tops: BTreeSet<&str> = v.iter().filter(|p| p.len() >= 2).map(|p| p[0]).collect();
    let (splits, classes): (Vec<&str>, Vec<&str>) = tops.iter().copied().partition(|t| is_split(t));
    let merged = !splits.is_empty();
    if merged && !classes.is_empty() {
        return Err(IngestError::Layout(format!(
            "ambiguous layout: split folders ({}) next to class folders ({}); use one folder \
             per class, optionally inside train/ and val/ folders",
            splits.join(", "),
            classes.join(", ")
        )));
    }
    if merged {
        if splits.len() > 1 {
            warnings.push(format!(
                "merged the {} folders: transferd makes its own stratified split",
                splits.join(", ")
            ));
        }
        skip += 1;
    }
    let v = view(skip);
    let class_of: Vec<Option<String>> = paths
        .iter()
        .zip(&v)
        .map(|(full, rest)| {
            let in_split = !merged || full.len() > skip;
            (rest.len() >= 2 && in_split).then(|| rest[0].to_string())
        })
        .collect();
    if class_of.iter().all(Option::is_none) {
        let loose = paths.len();
        return Err(IngestError::Layout(format!(
            "found {loose} file(s) but no class folders; put each class's images in a folder \
             named after the class (e.g. cat/1.jpg, dog/2.jpg)"
        )));
    }
    Ok(Layout {
        classes: class_of,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes(names: &[&str]) -> Result<Vec<Option<String>>, IngestError> {
        let paths: Vec<Vec<&str>> = names.iter().map(|n| n.split('/').collect()).collect();
        resolve(&paths).map(|l| l.classes)
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn plain_wrapped_and_split_layouts() {
        assert_eq!(
            classes(&["dog/a.jpg", "cat/b.jpg", "readme.txt"]).unwrap(),
            vec![some("dog"), some("cat"), None]
        );
        assert_eq!(
            classes(&["my data/dog/a.jpg", "my data/cat/x/b.jpg"]).unwrap(),
            vec![some("dog"), some("cat")]
        );
        assert_eq!(
            classes(&[
                "root/train/dog/a.jpg",
                "root/val/cat/b.jpg",
                "root/train/x.jpg"
            ])
            .unwrap(),
            vec![some("dog"), some("cat"), None]
        );
        assert_eq!(
            classes(&["train/dog/a.jpg", "train/cat/b.jpg"]).unwrap(),
            vec![some("dog"), some("cat")]
        );
    }

    #[test]
    fn ambiguous_and_flat_layouts_are_refused() {
        let err = classes(&["train/dog/a.jpg", "cat/b.jpg"]).unwrap_err();
        assert!(err.to_string().contains("ambiguous"), "{err}");
        let err = classes(&["a.jpg", "b.jpg"]).unwrap_err();
        assert!(err.to_string().contains("no class folders"), "{err}");
        assert!(classes(&[]).is_err());
    }
}
