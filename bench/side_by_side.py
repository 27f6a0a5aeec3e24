#!/usr/bin/env python3
"""transferd next to the peers a user would otherwise pick, on one machine in one go.

Driven by `bench/run.sh`, which builds the binaries and the peers' virtual environments.
Standard library only. In each round, alternately (transferd first in odd rounds, the peer
first in even ones, so that neither always gets the cooler machine):

  * transferd's default run through the service API: `transferd serve` on a free loopback
    port with its own data directory; upload the zip, queue a run with the default config,
    poll it to the end; then `POST /api/predict` with 1 and with 32 photos;
  * the tutorial's Keras pipeline (`peers/keras_seed.py`) on the same split, which
    `bench --split-out` writes;

then model-only inference: ONNX Runtime (`peers/onnx_peer.py`) and transferd's backbone
(`bench --inference-only`), interleaved over `--inference-rounds` rounds (alternating which
goes first), since a machine's speed drifts by tens of percent over minutes: each figure is the
median of its rounds, and each ratio is the median of the rounds' own ratios, shown with
them. Prints markdown tables
with the ratios transferd / peer.
"""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zipfile
from pathlib import Path


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=600):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def multipart(field, files):
    """A multipart/form-data body with one part per (name, bytes)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        parts.append(data)
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def vm_hwm_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# Set to 1, transferd runs burn's generic convs (nothing folded or fused): the "before" of
# the CPU kernels, measured with the same binary in the same run (`ml::fused::GENERIC_ENV`).
GENERIC_ENV = "TRANSFERD_GENERIC_CONVS"


def env_for(generic):
    env = dict(os.environ)
    env.pop(GENERIC_ENV, None)
    if generic:
        env[GENERIC_ENV] = "1"
    return env


def transferd_run(args, zip_path, val_photos, generic=False):
    """Upload, default run and predictions through the API of a fresh server."""
    work = Path(tempfile.mkdtemp(prefix="transferd-bench-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [args.transferd, "--data-dir", str(work / "data"), "serve", "--addr", f"127.0.0.1:{port}",
         "--weights", args.weights],
        stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, env=env_for(generic),
    )
    try:
        for _ in range(600):
            try:
                http("GET", f"{base}/readyz", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        t0 = time.perf_counter()
        body, headers = multipart("file", [(zip_path.name, zip_path.read_bytes())])
        dataset = http("POST", f"{base}/api/datasets", body, headers)
        upload = time.perf_counter() - t0
        t1 = time.perf_counter()
        run = http("POST", f"{base}/api/runs", json.dumps({"dataset_id": dataset["id"]}).encode(),
                   {"Content-Type": "application/json"})
        seen = {}  # stage -> first time it was seen running
        while True:
            run = http("GET", f"{base}/api/runs/{run['id']}")
            now = time.perf_counter() - t1
            if run["phase"] and run["phase"] not in seen:
                seen[run["phase"]] = now
            if run["status"] not in ("queued", "running"):
                break
            time.sleep(0.25)
        run_seconds = time.perf_counter() - t1
        if run["status"] != "succeeded":
            raise SystemExit(f"transferd run {run['status']}: {run.get('error')}")
        rss = vm_hwm_mib(server.pid)
        phases = {p["phase"]: p for p in run["phases"]}
        frozen = seen.get("warmup", run_seconds) - seen.get("frozen_pass", 0.0)
        evaluation = http("GET", f"{base}/api/runs/{run['id']}/evaluation")
        cfg = run["config"]

        photos = [Path(p["path"]).read_bytes() for p in val_photos[:32]]
        http("POST", f"{base}/api/predict", photos[0], {"Content-Type": "image/jpeg"})  # load
        single = []
        for i in range(args.predict_reps):
            t = time.perf_counter()
            http("POST", f"{base}/api/predict", photos[i % len(photos)], {"Content-Type": "image/jpeg"})
            single.append(time.perf_counter() - t)
        batch_body, batch_headers = multipart("image", [(f"{i}.jpg", b) for i, b in enumerate(photos)])
        batch = []
        for _ in range(max(3, args.predict_reps // 10)):
            t = time.perf_counter()
            out = http("POST", f"{base}/api/predict", batch_body, batch_headers)
            batch.append(time.perf_counter() - t)
        assert len(out["predictions"]) == len(photos), out
        train_images = dataset_count(dataset) - evaluation_total(evaluation)
        return {
            "upload_s": upload,
            "frozen_s": frozen,
            "warmup": phases.get("warmup"),
            "finetune": phases.get("finetune"),
            "run_s": run_seconds,
            "total_s": upload + run_seconds,
            "views": cfg["views"],
            "train_images": train_images,
            "val_accuracy": evaluation["accuracy"],
            "val_images": evaluation_total(evaluation),
            "peak_rss_mib": rss,
            "predict1_p50_ms": statistics.median(single) * 1e3,
            "predict32_p50_ms": statistics.median(batch) * 1e3,
        }
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        subprocess.run(["rm", "-rf", str(work)])


def dataset_count(dataset):
    return sum(c["count"] for c in dataset["classes"])


def evaluation_total(evaluation):
    return sum(sum(row) for row in evaluation["confusion"])


def keras_run(args, split_path):
    out = subprocess.run([args.keras_python, str(args.here / "peers/keras_seed.py"), str(split_path)],
                         capture_output=True, text=True, check=True)
    log(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def transferd_inference(args, generic=False):
    out = subprocess.run([args.bench, "--inference-only", "--batches", "1,32"], capture_output=True,
                         text=True, check=True, cwd=args.root, env=env_for(generic))
    rates = {}
    for line in out.stdout.splitlines():
        m = re.match(r"\| backbone forward, batch (\d+)[^|]*\| ([\d.]+) img/s", line)
        if m:
            rates[int(m.group(1))] = float(m.group(2))
        m = re.match(r"\| fine-tune step [^|]*\| ([\d.]+) img/s", line)
        if m:
            rates["step"] = float(m.group(1))
        m = re.match(r"\| device \| .*· (.*) \|", line)
        if m:
            rates["cpu"] = m.group(1)
    return rates


def onnx_inference(args):
    samples = args.root / "tests/fixtures/samples"
    out = subprocess.run([args.onnx_python, str(args.here / "peers/onnx_peer.py"), args.weights, str(samples)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def inference_rounds(args):
    """ONNX Runtime and transferd (and its generic path if asked), one after the other in each
    round, the order rotating between rounds."""
    rounds = {"ort": [], "flex": [], "generic": []}
    runners = [("ort", lambda: onnx_inference(args)), ("flex", lambda: transferd_inference(args))]
    if args.generic_baseline:
        runners.append(("generic", lambda: transferd_inference(args, generic=True)))
    for r in range(args.inference_rounds):
        # Rotated, so that each runner goes first in turn (and none is always in the middle).
        shift = r % len(runners)
        for name, run in runners[shift:] + runners[:shift]:
            log(f"inference round {r + 1}/{args.inference_rounds}: {name}")
            rounds[name].append(run())
            log(json.dumps(rounds[name][-1]))
    return rounds


def median_of(results):
    """Each numeric field's median over the rounds; other fields from the first round."""
    out = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in results)
    return out


def per_round(ours, theirs, f):
    """The ratio in each round (each pair measured minutes apart at most), for the tables:
    their median, and the values themselves, which show how much the machine moved them."""
    ratios = [f(a, b) for a, b in zip(ours, theirs)]
    return statistics.median(ratios), ", ".join(f"{r:.2f}" for r in ratios)


def mean(rows, f):
    return statistics.mean(f(r) for r in rows)


def fmt_ratio(ours, theirs):
    return f"{ours / theirs:.2f}×"


def report_generic(ours, before, flex, flex_before, rounds):
    """The CPU kernels against burn's generic convs: same binary, same run."""
    print("\n### transferd's CPU kernels vs burn's generic convs (same binary, "
          f"`{GENERIC_ENV}=1`), {flex['cpu']}\n")
    print("| measure | generic convs (before) | fused kernels (after) | speed-up |")
    print("|---|---|---|---|")
    speedup = lambda key: per_round(rounds["flex"], rounds["generic"], lambda a, b: a[key] / b[key])
    for key, name, target in [(1, "backbone forward, batch 1", ""),
                              (32, "backbone forward, batch 32", ""),
                              ("step", "fine-tune step (top block), batch 32", "; target ≥ 2.5×")]:
        ratio, each = speedup(key)
        print(f"| {name} | {flex_before[key]:.1f} img/s | {flex[key]:.1f} img/s | "
              f"**{ratio:.2f}×** (rounds: {each}{target}) |")
    if ours and before:
        for name, f in [("frozen pass", lambda r: r["frozen_s"]),
                        ("fine-tune phase", lambda r: r["finetune"]["seconds"] or 0.0),
                        ("whole run", lambda r: r["total_s"]),
                        ("`POST /api/predict` p50, 1 photo", lambda r: r["predict1_p50_ms"] / 1e3),
                        ("`POST /api/predict` p50, 32 photos", lambda r: r["predict32_p50_ms"] / 1e3)]:
            b, a = mean(before, f), mean(ours, f)
            unit = (lambda v: f"{v * 1e3:.1f} ms") if b < 5 else (lambda v: f"{v:.1f} s")
            print(f"| {name} | {unit(b)} | {unit(a)} | {b / a:.2f}× |")
        accs = lambda rows: ", ".join(f"{r['val_accuracy'] * 100:.2f}%" for r in rows)
        print(f"| validation accuracy | {accs(before)} | {accs(ours)} | |")


def report(args, ours, keras, ort, flex, rounds):
    n, k = len(ours), len(keras)
    print(f"\n### Training: transferd's default run vs the tutorial's Keras pipeline "
          f"(mean of {n} and {k} alternating runs)\n")
    print("| measure | transferd (service API) | Keras MobileNet (tutorial) | transferd / Keras |")
    print("|---|---|---|---|")
    t_frozen = mean(ours, lambda r: r["frozen_s"])
    t_warm = mean(ours, lambda r: r["warmup"]["seconds"])
    t_fine = mean(ours, lambda r: r["finetune"]["seconds"] or 0.0)
    k_warm = mean(keras, lambda r: r["phases"][0]["seconds"])
    k_fine = mean(keras, lambda r: r["phases"][1]["seconds"])
    print(f"| upload (validate, store) | {mean(ours, lambda r: r['upload_s']):.1f} s | — | |")
    print(f"| frozen pass (decode, augment, frozen backbone) | {t_frozen:.1f} s | — | |")
    warm_epochs = "/".join(str(r["warmup"]["epochs_run"]) for r in ours)
    fine_epochs = "/".join(str(r["finetune"]["epochs_run"]) for r in ours)
    print(f"| warm-up | {t_warm:.1f} s ({warm_epochs} epochs) | {k_warm:.1f} s "
          f"({keras[0]['phases'][0]['epochs']} epoch) | {fmt_ratio(t_warm, k_warm)} |")
    print(f"| fine-tune | {t_fine:.1f} s ({fine_epochs} epochs) | {k_fine:.1f} s "
          f"({keras[0]['phases'][1]['epochs']} epochs) | {fmt_ratio(t_fine, k_fine)} |")
    t_total = mean(ours, lambda r: r["total_s"])
    k_total = mean(keras, lambda r: r["total_seconds"])
    print(f"| **whole run** (transferd: upload + queued → succeeded) | **{t_total:.1f} s** | "
          f"**{k_total:.1f} s** | **{fmt_ratio(t_total, k_total)}** (target ≤ 0.15×) |")
    tr = ours[0]["train_images"]
    ours_ips = mean(ours, lambda r: r["train_images"] * r["views"] / r["frozen_s"])
    print(f"| training photos/s | frozen pass {ours_ips:.1f} views/s ({tr} photos × "
          f"{ours[0]['views']} views) | {mean(keras, lambda r: r['train_images_per_s']):.1f} "
          f"photo-epochs/s (6 × {keras[0]['train_images']}) | |")
    print(f"| peak RSS | {mean(ours, lambda r: r['peak_rss_mib']):.0f} MiB (server) | "
          f"{mean(keras, lambda r: r['peak_rss_mib']):.0f} MiB | "
          f"{fmt_ratio(mean(ours, lambda r: r['peak_rss_mib']), mean(keras, lambda r: r['peak_rss_mib']))} |")
    accs = ", ".join(f"{r['val_accuracy'] * 100:.2f}%" for r in ours)
    kaccs = ", ".join(f"{r['val_accuracy'] * 100:.2f}%" for r in keras)
    print(f"| validation accuracy ({ours[0]['val_images']} photos) | {accs} | {kaccs} "
          "(random init: no ImageNet weights here; the tutorial publishes ~80%) | |")

    print(f"\n### Inference at 224 px: transferd vs ONNX Runtime (same Lite0 weights), {flex['cpu']}; "
          f"medians of {args.inference_rounds} interleaved rounds\n")
    print("| measure | transferd | ONNX Runtime | transferd / ORT |")
    print("|---|---|---|---|")
    o1, o32 = ort["batch1_ms_per_call"], ort["batch32_ms_per_call"]
    f1 = 1000 / flex[1]
    f32 = 32 * 1000 / flex[32]
    r1, each1 = per_round(rounds["flex"], rounds["ort"], lambda a, b: 1000 / a[1] / b["batch1_ms_per_call"])
    r32, each32 = per_round(rounds["flex"], rounds["ort"], lambda a, b: a[32] / b["batch32_images_per_second"])
    print(f"| model only, batch 1 | {f1:.1f} ms ({flex[1]:.1f} img/s) | {o1:.1f} ms "
          f"({ort['batch1_images_per_second']:.1f} img/s) | **{r1:.2f}×** time (rounds: {each1}; "
          "target ≤ 1.5×) |")
    print(f"| model only, batch 32 | {f32:.0f} ms ({flex[32]:.1f} img/s) | {o32:.0f} ms "
          f"({ort['batch32_images_per_second']:.1f} img/s) | **{r32:.2f}×** throughput (rounds: "
          f"{each32}; target ≥ 0.7×) |")
    p1 = mean(ours, lambda r: r["predict1_p50_ms"])
    p32 = mean(ours, lambda r: r["predict32_p50_ms"])
    print(f"| `POST /api/predict` p50, 1 photo | {p1:.1f} ms | model only {o1:.1f} ms | "
          f"**{p1 / o1:.2f}×** (target ≤ 2×) |")
    print(f"| `POST /api/predict` p50, 32 photos | {p32:.0f} ms ({32000 / p32:.1f} img/s) | "
          f"model only {o32:.0f} ms | {p32 / o32:.1f}× |")


def main():
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(here.parent.parent / "shared/datasets/dogcat-sub"))
    ap.add_argument("--transferd", required=True)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--keras-python", required=True)
    ap.add_argument("--onnx-python", required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--predict-reps", type=int, default=30)
    ap.add_argument("--inference-rounds", type=int, default=3,
                    help="interleaved rounds of the model-only measurements (medians reported)")
    ap.add_argument("--skip-training", action="store_true", help="inference rows only")
    ap.add_argument("--generic-baseline", action="store_true",
                    help=f"also run transferd with {GENERIC_ENV}=1 and print the before/after table")
    args = ap.parse_args()
    if args.inference_rounds < 1:
        ap.error("--inference-rounds must be at least 1")
    args.here, args.root = here, here.parent

    work = Path(tempfile.mkdtemp(prefix="side-by-side-"))
    split = work / "split.json"
    subprocess.run([args.bench, args.data, "--split-out", str(split)], check=True, cwd=args.root)
    val_photos = json.loads(split.read_text())["val"]
    data = Path(args.data).resolve()
    zip_path = work / f"{data.name}.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        for f in sorted(data.rglob("*")):
            if f.is_file() and f.parent != data:
                z.write(f, f.relative_to(data))

    ours, keras, before = [], [], []
    if not args.skip_training:
        for r in range(args.rounds):
            order = ["transferd", "keras"] if r % 2 == 0 else ["keras", "transferd"]
            for who in order:
                log(f"round {r + 1}/{args.rounds}: {who}")
                t = time.perf_counter()
                if who == "transferd":
                    ours.append(transferd_run(args, zip_path, val_photos))
                    log(json.dumps(ours[-1]))
                    if args.generic_baseline:
                        before.append(transferd_run(args, zip_path, val_photos, generic=True))
                        log("generic: " + json.dumps(before[-1]))
                else:
                    keras.append(keras_run(args, split))
                    log(json.dumps(keras[-1]))
                log(f"  {time.perf_counter() - t:.0f} s")
    rounds = inference_rounds(args)
    ort, flex = median_of(rounds["ort"]), median_of(rounds["flex"])
    if ours and keras:
        report(args, ours, keras, ort, flex, rounds)
    else:
        print(json.dumps({"ort": ort, "flex": flex, "rounds": rounds}))
    if args.generic_baseline:
        report_generic(ours, before, flex, median_of(rounds["generic"]), rounds)
    subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
