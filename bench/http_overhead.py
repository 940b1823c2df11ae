"""What the HTTP API adds to `vlmd serve`: resident memory and start-up time.

Each measurement is a fresh process: it starts the service (demo model, embedded broker on a
free port) with or without `[http] listen = "127.0.0.1:0"`, then reports its RSS once the first
answer is done (over MQTT without the API, over HTTP with it), the seconds the HTTP
server took to start (import excluded), and the seconds and RSS importing starlette and uvicorn
took (daemon.service imports them either way).

    python bench/http_overhead.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, os
import psutil
rss0 = psutil.Process().memory_info().rss
t0 = time.perf_counter()
import starlette.applications, uvicorn  # noqa
import_s = time.perf_counter() - t0
import_rss = psutil.Process().memory_info().rss - rss0
from daemon.config import load_config
from daemon.service import Service
from daemon.http import server as http_server
env = {"VLMD_EMBEDDED_BROKER__PORT": "0", "VLMD_DEVICE_ID": "bench-http", "VLMD_JOURNAL__ENABLED": "false"}
if sys.argv[1] == "http":
    env["VLMD_HTTP__LISTEN"] = "127.0.0.1:0"
service = Service(load_config(None, env=env))
started = {}
original = http_server.HttpServer.start
def timed(self):
    t = time.perf_counter(); result = original(self); started["s"] = time.perf_counter() - t; return result
http_server.HttpServer.start = timed
service.start()
if sys.argv[1] == "http":
    import urllib.request
    body = json.dumps({"model": "demo_model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode()
    request = urllib.request.Request(service.http.url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=60).read()
else:
    from npu.engine import GenerationOptions, Prompt
    list(service.worker.engine.generate(Prompt("Hi"), GenerationOptions(max_tokens=4)))
rss = psutil.Process().memory_info().rss
service.stop(2.0)
print(json.dumps({"rss_mb": rss / 2**20, "http_start_s": started.get("s", 0.0), "import_s": import_s,
                  "import_mb": import_rss / 2**20}))
"""


def run(kind: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = {kind: [run(kind) for _ in range(args.runs)] for kind in ("mqtt", "http")}
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    mqtt_rss = median([r["rss_mb"] for r in rows["mqtt"]])
    http_rss = median([r["rss_mb"] for r in rows["http"]])
    print(f"RSS without the API {mqtt_rss:.1f} MiB, with it {http_rss:.1f} MiB: +{http_rss - mqtt_rss:.1f} MiB")
    print(f"import starlette+uvicorn {median([r['import_s'] for r in rows['http']]) * 1e3:.0f} ms,"
          f" {median([r['import_mb'] for r in rows['http']]):.1f} MiB (paid whether the API is on or not),"
          f" HttpServer.start {median([r['http_start_s'] for r in rows['http']]) * 1e3:.1f} ms (medians of {args.runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
