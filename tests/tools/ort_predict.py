#!/usr/bin/env python3
"""Runs an exported transferd ONNX model with ONNX Runtime, as a third-party user would.

Usage: python3 tests/tools/ort_predict.py MODEL.onnx INPUT.f32 N S

INPUT.f32 holds N preprocessed images as raw little-endian float32 of shape [N, 3, S, S]
(what transferd's preprocessing produces). Prints one JSON object on stdout:
{"probabilities": [[...], ...], "classes": [...]}, the classes read from the model's
metadata (`classes`), in output order.
"""

import json
import sys

import numpy as np
import onnxruntime as ort


def main(argv):
    if len(argv) != 5:
        sys.exit(f"usage: {argv[0]} MODEL.onnx INPUT.f32 N S")
    model, data, n, s = argv[1], argv[2], int(argv[3]), int(argv[4])

    images = np.fromfile(data, dtype="<f4")
    expected = n * 3 * s * s
    if images.size != expected:
        sys.exit(f"{data} holds {images.size} floats, not N*3*S*S = {expected}")
    images = images.reshape(n, 3, s, s).astype(np.float32, copy=False)

    options = ort.SessionOptions()
    # One thread each: the tests run next to other work, and results do not depend on it.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    input_name = session.get_inputs()[0].name
    (probabilities,) = session.run(["probabilities"], {input_name: images})
    classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    json.dump({"probabilities": probabilities.tolist(), "classes": classes}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv)
