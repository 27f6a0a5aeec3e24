"""Writes scikit-learn's bundled handwritten digits (UCI optdigits, 1,797 8x8 grey images,
10 classes; shipped inside the scikit-learn wheel, BSD-3-Clause) as a folder-per-class
dataset of 64x64 PNGs, for the multi-class learning curve of bench/README.md.

Usage: python make_digits.py OUT_DIR
"""

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def write_png(path, grey):
    """An 8-bit greyscale PNG from the standard library alone."""
    import struct
    import zlib

    h, w = grey.shape
    raw = b"".join(b"\x00" + grey[r].tobytes() for r in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def main(out):
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = Path(out) / f"digit-{label}"
        folder.mkdir(parents=True, exist_ok=True)
        # Ink dark on white, as on paper; each pixel becomes an 8x8 block.
        grey = (255 - image * 255 / 16).astype(np.uint8)
        write_png(folder / f"{i:04d}.png", np.kron(grey, np.ones((8, 8), dtype=np.uint8)))
    print(f"wrote {len(digits.target)} images in 10 classes to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
