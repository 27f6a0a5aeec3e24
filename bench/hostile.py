#!/usr/bin/env python3
"""Hostile-input benchmark (not part of the test suite): starts `transferd serve` on a free
loopback port with default limits, trains a tiny model on the test fixtures, then sends the
inputs the hardening issue names and prints, for each, the answer, how long it took and the
server's peak RSS while it ran (sampled every 10 ms from /proc).

Usage: python3 bench/hostile.py BINARY [DATASET_DIR]
  BINARY       the release build of transferd
  DATASET_DIR  a folder-per-class dataset large enough for the oversized config to matter
               (default ../shared/datasets/dogcat-sub; the row says n/a without it)

Standard library only. Needs the Lite0 weights where `transferd weights path` finds them.
"""

import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rss:
    """Samples a process's VmRSS while a probe runs; reports the peak in MiB."""

    def __init__(self, pid):
        self.pid, self.peak, self.running = pid, 0, False

    def sample(self):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) // 1024
        except OSError:
            return 0
        return 0

    def __enter__(self):
        self.peak, self.running = self.sample(), True

        def loop():
            while self.running:
                self.peak = max(self.peak, self.sample())
                time.sleep(0.01)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def request(port, method, path, body=b"", headers=None, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        res = conn.getresponse()
        data = res.read()
        return res.status, data
    except (ConnectionError, OSError) as e:
        return None, str(e).encode()
    finally:
        conn.close()


def stream_post(port, path, content_type, parts, timeout=60):
    """POSTs a body given as parts (sent in 1 MiB pieces) over a raw socket, and reads the
    answer even when the server stops reading early: what a client sending a huge body sees."""
    total = sum(len(p) for p in parts)
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {total}\r\nConnection: close\r\n\r\n".encode())
    sent = 0
    try:
        for part in parts:
            view = memoryview(part)
            for i in range(0, len(view), 1 << 20):
                s.sendall(view[i:i + (1 << 20)])
                sent += len(view[i:i + (1 << 20)])
    except OSError:
        pass  # the server answered and closed
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        pass
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/") else None
    return status, body, sent


def summary(status, data):
    try:
        err = json.loads(data)["error"]
        return f"{status} {err['code']}: {err['message'][:200]}"
    except Exception:
        return f"{status} {data[:60]!r}"


def zip_of_folder(folder):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder))
    return buf.getvalue()


def zip64_claiming(entries, directory_bytes):
    """An archive whose zip64 end record declares `entries` entries in the `directory_bytes`
    (zeros) before it, consistently laid out: what a 45-million-entry zip's tail says,
    without the 4 GB of entries."""
    record = b"PK\x06\x06" + struct.pack("<Q", 44) + bytes(12)
    record += struct.pack("<QQQQ", entries, entries, directory_bytes, 0)
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, directory_bytes, 1)
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return bytes(directory_bytes) + record + locator + end


def huge_png(side):
    """A valid, highly compressible side x side RGB PNG (about 0.4 MB at 12,000 px)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes(side * 3)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def main():
    binary = sys.argv[1]
    dataset = Path(sys.argv[2] if len(sys.argv) > 2 else ROOT / "../shared/datasets/dogcat-sub")
    weights = json.loads(subprocess.check_output([binary, "--data-dir", str(ROOT / "data"), "weights", "path"]))["path"]
    work = tempfile.mkdtemp()
    port = free_port()
    log = open(os.path.join(work, "server.log"), "w")
    server = subprocess.Popen(
        [binary, "--data-dir", os.path.join(work, "data"), "serve", "--addr", f"127.0.0.1:{port}",
         "--weights", weights, "--min-images-per-class", "2"],
        stdout=log, stderr=log, env={**os.environ, "RUST_LOG": "warn"})
    rows = []
    try:
        while request(port, "GET", "/readyz")[0] != 200:
            time.sleep(0.2)
        status, data = request(port, "POST", "/api/datasets", zip_of_folder(ROOT / "tests/fixtures/pets"),
                               {"Content-Type": "application/zip"})
        pets = json.loads(data)["id"]
        _, data = request(port, "POST", "/api/runs", json.dumps({"dataset_id": pets}).encode(),
                          {"Content-Type": "application/json"})
        run = json.loads(data)["id"]
        while json.loads(request(port, "GET", f"/api/runs/{run}")[1])["status"] not in ("succeeded", "failed"):
            time.sleep(0.5)

        def probe(name, fn):
            with Rss(server.pid) as rss:
                t0 = time.time()
                answer = fn()
                took = time.time() - t0
            rows.append((name, answer, took, rss.peak))

        probe("zip whose zip64 end record declares 45,000,000 entries (1 MiB body)",
              lambda: summary(*request(port, "POST", "/api/datasets", zip64_claiming(45_000_000, 1 << 20),
                                       {"Content-Type": "application/zip"})))
        png = huge_png(12_000)
        probe(f"12000 x 12000 PNG to predict ({len(png) / 1e6:.1f} MB)",
              lambda: summary(*request(port, "POST", "/api/predict", png, {"Content-Type": "image/png"})))
        boundary = "hostile-b0undary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        gigabyte = bytes(1 << 30)

        def name_field():
            status, body, sent = stream_post(port, "/api/datasets", f"multipart/form-data; boundary={boundary}",
                                             [head, gigabyte, tail])
            json_part = body[body.find(b"{"):body.rfind(b"}") + 1]
            return f"{summary(status, json_part)} (client sent {sent >> 20} MiB before the answer)"

        probe("1 GB multipart `name` field", name_field)
        del gigabyte

        def idle():
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(1000)]
            t0 = time.time()
            status, _ = request(port, "GET", "/healthz", timeout=60)
            health = time.time() - t0
            time.sleep(11)  # past the 10 s header-read timeout
            closed = 0
            for s in socks:
                s.settimeout(0.01)
                try:
                    closed += s.recv(1) == b""
                except (socket.timeout, OSError):
                    pass
                s.close()
            return f"/healthz {status} in {health * 1000:.0f} ms with them open; {closed} of 1000 closed by the server after 11 s"

        probe("1,000 idle connections", idle)

        if dataset.is_dir():
            _, data = request(port, "POST", "/api/datasets", zip_of_folder(dataset), {"Content-Type": "application/zip"})
            big = json.loads(data)["id"]
            config = {"input_size": 512, "views": 16, "finetune": {"enabled": True, "unfreeze": 15}}
            probe(f"oversized config on {dataset.name} ({json.dumps(config)})",
                  lambda: summary(*request(port, "POST", "/api/runs", json.dumps({"dataset_id": big, "config": config}).encode(),
                                           {"Content-Type": "application/json"})))
        else:
            rows.append(("oversized config", f"n/a (no dataset at {dataset})", 0, 0))
        probe("cross-site form post to POST /api/runs (text/plain, Origin and Sec-Fetch-Site of another site)",
              lambda: summary(*request(port, "POST", "/api/runs", json.dumps({"dataset_id": pets}).encode(),
                                       {"Content-Type": "text/plain", "Origin": "https://evil.example",
                                        "Sec-Fetch-Site": "cross-site"})))
        alive = request(port, "GET", "/healthz")[0]
    finally:
        server.terminate()
        server.wait()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
    ext = " ".join(f for f in ("avx2", "fma", "avx512f") if f in flags)
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores, {ext}; server still healthy at the end: {alive == 200}\n")
    print("| input | answer | time | server peak RSS |")
    print("|---|---|---|---|")
    for name, answer, took, peak in rows:
        print(f"| {name} | {answer} | {took:.3f} s | {peak} MiB |")


if __name__ == "__main__":
    main()
