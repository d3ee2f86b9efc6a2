#!/usr/bin/env python3
"""Disk used per million events: the figure behind deploy/README.md's sizing rule.

Starts BINARY (`tidewire serve`, default config: fsync always, 7-day retention) on a free
loopback port with a fresh data dir, publishes exactly --events events whose JSON envelope
is --size bytes (`{"data":{"seq":…,"pad":"xxx…"}}`, the load tool's shape) to --topics topics,
--batch events per request from --conns keep-alive connections, stops it with SIGTERM, then
reports `du -sb` (apparent bytes) and `du -sB1` (allocated blocks) of the data dir and runs
`tidewire inspect` on it. Bounded: exactly events/batch requests; stops by itself.

    python3 deploy/disk_usage.py target/release/tidewire --events 1000000 --batch 1000
    python3 deploy/disk_usage.py target/release/tidewire --events 1000000 --batch 1 --conns 64

deploy/check.sh runs it with a small --events so it keeps working.
"""

import argparse
import atexit
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envelope(seq, size):
    head = '{"data":{"seq":%d,"pad":"' % seq
    return head + "x" * max(1, size - len(head) - 3) + '"}}'


def du(path, *flags):
    out = subprocess.run(["du", "-s", *flags, path], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("binary")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--topics", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--keep", help="keep the data dir here instead of a temp dir")
    a = ap.parse_args()
    if a.events % a.batch:
        sys.exit("--events must be a multiple of --batch")
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="tidewire-disk.")
    atexit.register(shutil.rmtree, tmp, True)
    data = a.keep or os.path.join(tmp, "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEWIRE_")}
    env["RUST_LOG"] = "warn"
    server = subprocess.Popen([a.binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data], env=env)
    try:
        for _ in range(300):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            sys.exit("server not ready")
        requests = a.events // a.batch
        lock = threading.Lock()
        nxt = [0]
        errors = []
        stored = [0]

        def worker():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            while True:
                with lock:
                    r = nxt[0]
                    if r >= requests:
                        return
                    nxt[0] += 1
                first = r * a.batch
                evs = [envelope(first + i, a.size) for i in range(a.batch)]
                body = evs[0] if a.batch == 1 else "[" + ",".join(evs) + "]"
                conn.request("POST", f"/v1/topics/disk/t{r % a.topics}/events", body,
                             {"content-type": "application/json"})
                resp = conn.getresponse()
                answer = resp.read()
                if resp.status != 201:
                    errors.append((resp.status, answer[:200]))
                    return
                with lock:
                    stored[0] += json.loads(answer)["count"]

        t0 = time.monotonic()
        threads = [threading.Thread(target=worker) for _ in range(min(a.conns, requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - t0
        if errors:
            sys.exit(f"publish failed: {errors[0]}")
        fds = len(os.listdir(f"/proc/{server.pid}/fd"))
        with open(f"/proc/{server.pid}/status") as f:
            rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    finally:
        server.send_signal(signal.SIGTERM)
        rc = server.wait(timeout=60)
    apparent, allocated = du(data, "-b"), du(data, "-B1")
    inspect = subprocess.run([a.binary, "inspect", "--data-dir", data], capture_output=True, text=True)
    print(inspect.stdout.rstrip())
    per_m = lambda b: b * 1_000_000 / stored[0]
    print(f"events={stored[0]} size={a.size} batch={a.batch} conns={a.conns} topics={a.topics} "
          f"publish_secs={took:.1f} server_exit={rc}")
    print(f"server after publishing: open_fds={fds} rss_kib={rss}")
    print(f"du -sb (apparent) = {apparent} bytes = {per_m(apparent) / 1e6:.1f} MB per million events "
          f"({apparent / stored[0]:.1f} B/event; envelope {a.size} B)")
    print(f"du -sB1 (allocated) = {allocated} bytes = {per_m(allocated) / 1e6:.1f} MB per million events")
    if rc != 0 or inspect.returncode != 0:
        sys.exit(f"server exit {rc}, inspect exit {inspect.returncode}")


if __name__ == "__main__":
    main()
