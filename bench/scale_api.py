"""Upload and predict latency of two transferd servers side by side (bench/scale.sh runs it):
A on SQLite + local files, B on PostgreSQL + S3. Requests alternate between the two, one at
a time, so that both see the same machine at the same moments.

usage: scale_api.py BASE_A BASE_B FIXTURES_DIR UPLOADS PREDICTS
"""
import io
import json
import statistics
import sys
import time
import urllib.request
import uuid
import zipfile
from pathlib import Path


def request(method, url, body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=120) as res:
        return res.status, json.loads(res.read() or b"null")


def pets_zip(fixtures):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path in sorted((fixtures / "pets").rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(fixtures / "pets").as_posix())
    return buf.getvalue()


def upload(base, data):
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"pets.zip\"\r\n"
        "Content-Type: application/zip\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    status, dataset = request(
        "POST", f"{base}/api/datasets", body,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert status == 201, (status, dataset)
    return dataset


def train(base, dataset_id):
    config = {"backbone": "lite0", "input_size": 128, "batch_size": 8, "views": 2,
              "finetune": {"enabled": False}}
    status, run = request("POST", f"{base}/api/runs",
                          json.dumps({"dataset_id": dataset_id, "config": config}).encode(),
                          {"Content-Type": "application/json"})
    assert status == 202, (status, run)
    while True:
        _, run = request("GET", f"{base}/api/runs/{run['id']}")
        if run["status"] == "succeeded":
            return run["id"]
        assert run["status"] in ("queued", "running"), run
        time.sleep(0.5)


def timed(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def row(name, a, b):
    pa, pb = statistics.median(a), statistics.median(b)
    qa = statistics.quantiles(a, n=10)[-1] if len(a) > 1 else a[0]
    qb = statistics.quantiles(b, n=10)[-1] if len(b) > 1 else b[0]
    print(f"| {name} | {len(a)} | {pa:.1f} | {qa:.1f} | {pb:.1f} | {qb:.1f} | {pb / pa:.2f}x |")


def main():
    base_a, base_b, fixtures, uploads, predicts = sys.argv[1:6]
    fixtures = Path(fixtures)
    data = pets_zip(fixtures)
    image = (fixtures / "samples" / "test_cat.jpg").read_bytes()
    up = {base_a: [], base_b: []}
    first = {}
    for _ in range(int(uploads)):
        for base in (base_a, base_b):
            start = time.perf_counter()
            dataset = upload(base, data)
            up[base].append((time.perf_counter() - start) * 1e3)
            first.setdefault(base, dataset)
    models = {base: train(base, first[base]["id"]) for base in (base_a, base_b)}
    pred = {base_a: [], base_b: []}
    for i in range(int(predicts)):
        for base in (base_a, base_b):
            def call():
                status, body = request("POST", f"{base}/api/predict", image,
                                       {"Content-Type": "image/jpeg"})
                assert status == 200 and body["model_id"] == models[base], body
            pred[base].append(timed(call))
    print(f"{len(data) / 1024:.0f} KiB zip (24 photos); predictions of one 224 px photo by "
          "a Lite0 model at 128 px; milliseconds")
    print()
    print("| request | n | SQLite + local p50 | p90 | PostgreSQL + S3 p50 | p90 | ratio (p50) |")
    print("|---|---|---|---|---|---|---|")
    row("POST /api/datasets", up[base_a], up[base_b])
    row("POST /api/predict", pred[base_a], pred[base_b])


if __name__ == "__main__":
    main()
