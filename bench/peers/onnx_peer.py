"""Inference peer: the same EfficientNet-Lite0 weights in ONNX Runtime (CPU).

Builds the ONNX graph from the `.pth` (TF "SAME" padding, BatchNorm eps 1e-3, ReLU6, the
1000-class head), checks it on the two sample photos, and times model-only inference at
batch 1 and 32, 224 px. Prints one JSON object.

    python bench/peers/onnx_peer.py WEIGHTS.pth SAMPLES_DIR     (ORT_THREADS=1 for one thread)
Requirements: bench/peers/requirements-onnx.txt
"""
import json
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from legacy_pth import load

STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


def build(w):
    nodes, inits = [], []
    six = numpy_helper.from_array(np.array(6.0, np.float32), "six")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    inits += [six, zero]

    def param(name):
        inits.append(numpy_helper.from_array(w[name].astype(np.float32), name))
        return name

    def conv(x, prefix, stride, groups, out):
        nodes.append(helper.make_node("Conv", [x, param(prefix + ".weight")], [out],
                                      strides=[stride, stride], group=groups, auto_pad="SAME_UPPER"))
        return out

    def bn(x, prefix, out, relu=True):
        names = [param(f"{prefix}.{k}") for k in ("weight", "bias", "running_mean", "running_var")]
        y = out + "_bn" if relu else out
        nodes.append(helper.make_node("BatchNormalization", [x] + names, [y], epsilon=1e-3))
        if relu:
            nodes.append(helper.make_node("Clip", [y, "zero", "six"], [out]))
        return out

    x = bn(conv("input", "_conv_stem", 2, 1, "stem"), "_bn0", "stem_act")
    b = 0
    for repeats, k, stride, expand, cin, cout in STAGES:
        for r in range(repeats):
            i = cin if r == 0 else cout
            s = stride if r == 0 else 1
            p = f"_blocks.{b}"
            h = x
            if expand != 1:
                h = bn(conv(h, f"{p}._expand_conv", 1, 1, f"b{b}_e"), f"{p}._bn0", f"b{b}_ea")
            h = bn(conv(h, f"{p}._depthwise_conv", s, i * expand, f"b{b}_d"), f"{p}._bn1", f"b{b}_da")
            h = bn(conv(h, f"{p}._project_conv", 1, 1, f"b{b}_p"), f"{p}._bn2", f"b{b}_pa", relu=False)
            if s == 1 and i == cout:
                nodes.append(helper.make_node("Add", [h, x], [f"b{b}_out"]))
                h = f"b{b}_out"
            x = h
            b += 1
    x = bn(conv(x, "_conv_head", 1, 1, "head"), "_bn1", "head_act")
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"]))
    nodes.append(helper.make_node("Gemm", ["flat", param("_fc.weight"), param("_fc.bias")], ["logits"], transB=1))
    graph = helper.make_graph(nodes, "efficientnet_lite0",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def preprocess(path):
    """Shorter side to 256, centre crop 224, (x - 127) / 128, as transferd does."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = 256 / min(w, h)
    img = img.resize((max(224, round(w * scale)), max(224, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    arr = np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32)
    return ((arr - 127.0) / 128.0).transpose(2, 0, 1)


def images_per_second(session, batch, seconds=10.0):
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    session.run(None, {"input": x})  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {"input": x})
        runs += 1
    elapsed = time.perf_counter() - start
    return runs * batch / elapsed, elapsed / runs * 1000


def main():
    weights, samples = sys.argv[1], sys.argv[2]
    model = build(load(weights))
    options = ort.SessionOptions()
    threads = int(os.environ.get("ORT_THREADS", "0"))  # 0: ONNX Runtime's default, all cores
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = {"onnxruntime": ort.__version__, "threads": threads or "default (all cores)"}
    for name in ("test_cat.jpg", "test_dog.jpg"):
        logits = session.run(None, {"input": preprocess(f"{samples}/{name}")[None]})[0][0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p)[:3]
        out[name] = [[int(i), round(float(p[i]), 3)] for i in top]
    for batch in (1, 32):
        ips, ms = images_per_second(session, batch)
        out[f"batch{batch}_images_per_second"] = round(ips, 1)
        out[f"batch{batch}_ms_per_call"] = round(ms, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
