#!/usr/bin/env python3
"""The tutorial's own pipeline, as the training peer of `bench/run.sh` (not a test).

Keras MobileNet on the dog/cat photos, as the tutorial does it:
  * a `DataGenerator` (a `keras.utils.PyDataset`) that reads the photos from disk every epoch,
    resizes them to 224x224 and augments them with a random zoom in [0.5, 1] and a brightness
    factor in [0.8, 1] (the tutorial's `ImageDataGenerator(zoom_range=[0.5, 1.0],
    brightness_range=[0.8, 1.0])`, written out here because Keras 3 no longer exports that
    class), batch 32;
  * `MobileNet(include_top=False)` + `Flatten` + `Dense(1, sigmoid)`, binary cross-entropy,
    Adam;
  * one warm-up epoch with the base frozen, then five fine-tune epochs with everything
    trainable.

The split is transferd's own (`bench --split-out FILE`), so both sides train and validate on
the same photos. MobileNet's ImageNet weights cannot be downloaded here, so the base starts
from random weights (`weights=None`): the wall time is the tutorial's, the accuracy is not
(the tutorial publishes about 80% with ImageNet weights). The result is printed as one JSON
line, last.

Usage: keras_seed.py SPLIT.json [--warmup-epochs 1] [--finetune-epochs 5] [--batch 32]
"""

import argparse
import json
import math
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402

import keras  # noqa: E402
from keras import layers  # noqa: E402
from keras.applications import mobilenet  # noqa: E402

SIZE = 224


def peak_rss_mib():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(path, rng=None):
    """A photo as 224x224 float RGB; with `rng`, zoomed and dimmed like the tutorial's."""
    img = Image.open(path).convert("RGB")
    if rng is not None:
        # ImageDataGenerator's zoom_range=[0.5, 1]: independent x and y factors, a factor
        # below 1 showing a smaller centred region (zooming in).
        zx, zy = rng.uniform(0.5, 1.0, size=2)
        w, h = img.size
        cw, ch = w * zx, h * zy
        left, top = (w - cw) / 2, (h - ch) / 2
        img = img.crop((left, top, left + cw, top + ch))
        # brightness_range=[0.8, 1]: PIL's brightness enhancer, as Keras applies it.
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.0))
    img = img.resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


class DataGenerator(keras.utils.PyDataset):
    """Batches of (photos, labels) read from disk, shuffled and augmented each epoch."""

    def __init__(self, samples, batch_size, augment, seed):
        super().__init__()
        self.samples = samples
        self.batch_size = batch_size
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        self.order = np.arange(len(samples))
        self.on_epoch_end()

    def __len__(self):
        return math.ceil(len(self.samples) / self.batch_size)

    def __getitem__(self, i):
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        rng = self.rng if self.augment else None
        x = np.stack([load(self.samples[j]["path"], rng) for j in idx])
        y = np.array([self.samples[j]["label"] for j in idx], dtype=np.float32)
        return mobilenet.preprocess_input(x), y

    def on_epoch_end(self):
        if self.augment:
            self.rng.shuffle(self.order)


def build():
    base = mobilenet.MobileNet(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)
    )
    model = keras.Sequential(
        [keras.Input((SIZE, SIZE, 3)), base, layers.Flatten(), layers.Dense(1, activation="sigmoid")]
    )
    return base, model


def phase(name, model, train, val, epochs):
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    t = time.perf_counter()
    history = model.fit(train, validation_data=val, epochs=epochs, verbose=2)
    seconds = time.perf_counter() - t
    return {
        "phase": name,
        "epochs": epochs,
        "seconds": seconds,
        "val_accuracy": float(history.history["val_accuracy"][-1]),
        "val_loss": float(history.history["val_loss"][-1]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("split", help="JSON written by `bench --split-out`")
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--finetune-epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    with open(args.split) as f:
        split = json.load(f)
    if len(split["classes"]) != 2:
        sys.exit("the tutorial's head is one sigmoid: it needs exactly two classes")
    keras.utils.set_random_seed(args.seed)
    started = time.perf_counter()
    train = DataGenerator(split["train"], args.batch, augment=True, seed=args.seed)
    val = DataGenerator(split["val"], args.batch, augment=False, seed=args.seed)
    base, model = build()

    phases = []
    base.trainable = False
    phases.append(phase("warmup", model, train, val, args.warmup_epochs))
    base.trainable = True
    phases.append(phase("finetune", model, train, val, args.finetune_epochs))
    total = time.perf_counter() - started

    epochs = args.warmup_epochs + args.finetune_epochs
    print(
        json.dumps(
            {
                "peer": "keras",
                "versions": {"keras": keras.__version__, "backend": keras.backend.backend()},
                "weights": "none (random: ImageNet weights cannot be downloaded here)",
                "train_images": len(split["train"]),
                "val_images": len(split["val"]),
                "phases": phases,
                "total_seconds": total,
                "train_images_per_s": epochs * len(split["train"]) / sum(p["seconds"] for p in phases),
                "val_accuracy": phases[-1]["val_accuracy"],
                "peak_rss_mib": peak_rss_mib(),
            }
        )
    )


if __name__ == "__main__":
    main()
