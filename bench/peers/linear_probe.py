"""Linear-probe peer: scikit-learn's LogisticRegressionCV on the frozen pooled features.

Reads what `learning_curve` wrote (`features.f32`: the pretrained EfficientNet-Lite0's
pooled 1280-d features of every photo's clean view; `index.json`: labels, the fixed test
photos and, per run, the training photos and transferd's test accuracy). For each run it
fits the peer on the same training photos (L2, C chosen by stratified k-fold among 10
values, as `LogisticRegressionCV` does by default), scores the same test photos, and
prints both side by side: one row per run, then mean and spread per size.

Usage: python linear_probe.py DIR [SIZES]   (SIZES: a comma-separated subset of the run
sizes, e.g. 5,10,20; all of them by default)
"""

import json
import statistics
import sys
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold


def main(out_dir, sizes=None):
    index = json.load(open(f"{out_dir}/index.json"))
    labels = np.array(index["labels"])
    x = np.fromfile(f"{out_dir}/features.f32", dtype="<f4").reshape(len(labels), -1)
    test = np.array(index["test"])
    warnings.simplefilter("ignore", ConvergenceWarning)
    rows = []
    for run in index["runs"]:
        if sizes is not None and run["size"] not in sizes:
            continue
        train = np.array(run["train"])
        per_class = np.bincount(labels[train]).min()
        folds = StratifiedKFold(n_splits=int(min(5, per_class)), shuffle=True, random_state=run["seed"])
        probe = LogisticRegressionCV(Cs=10, cv=folds, max_iter=1000)
        probe.fit(x[train], labels[train])
        peer = float((probe.predict(x[test]) == labels[test]).mean())
        ours = run["transferd"]["accuracy"]
        rows.append((run["size"], run["seed"], ours, peer))
        print(f"| {run['size']} | {run['seed']} | {ours:.2%} | {peer:.2%} | {ours - peer:+.2%} | C={probe.C_[0]:.3g} |",
              flush=True)
    print()
    print(f"Test photos: {len(test)}, classes: {len(index['classes'])}, seeds per size: "
          f"{len({r[1] for r in rows})}")
    print()
    print("| photos per class | transferd mean (min–max) | linear probe mean (min–max) | difference, mean (min–max) |")
    print("|---|---|---|---|")
    for size in dict.fromkeys(r[0] for r in rows):
        sel = [r for r in rows if r[0] == size]
        ours = [r[2] for r in sel]
        peer = [r[3] for r in sel]
        diff = [a - b for a, b in zip(ours, peer)]
        fmt = lambda v: f"{statistics.mean(v):.2%} ({min(v):.2%}–{max(v):.2%})"
        print(f"| {size} | {fmt(ours)} | {fmt(peer)} | {statistics.mean(diff):+.2%} ({min(diff):+.2%}–{max(diff):+.2%}) |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else None)
