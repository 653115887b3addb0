#!/usr/bin/env python3
"""Soak: a million requests through a reused WASIp3 guest and a reused
WASIp2 guest, on the release binary, with wrk. Passes when there are zero
errors, RSS grows less than 10% after warm-up, and the live instance count
falls back to zero after the idle timeout. Opt-in (minutes):

    tests/soak.sh [REQUESTS]     # or WASMPOOL_SOAK=1 tests/run-all.sh
"""

import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
from bench import Server, free_port, wasmpool_cmd, wrk  # noqa: E402


def soak(bin_, guest, flags, total, cache):
    port, mport = free_port(), free_port()
    s = Server("wasmpool", wasmpool_cmd(bin_, guest, port, flags + ["--idle-instance-timeout", "2s"],
                                        cache, mport), port, metrics_port=mport)
    wrk(s.url, 5, 16)  # warm-up
    rss0 = s.rss_kib()
    done = errors = 0
    t0 = time.time()
    while done < total:
        out = subprocess.run(["wrk", "-t1", "-c16", "-d10s", s.url + "/"],
                             capture_output=True, text=True, check=True).stdout
        done += int(re.search(r"(\d+) requests in", out).group(1))
        m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        errors += int(m.group(1)) if m else 0
        m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        errors += sum(map(int, m.groups())) if m else 0
    secs = time.time() - t0
    rss1 = s.rss_kib()
    peak = s.metric("wasmpool_instances_peak")
    reused = s.metric("wasmpool_instances_reused_total")
    deadline = time.time() + 10
    while s.metric("wasmpool_instances_live") != 0 and time.time() < deadline:
        time.sleep(0.2)
    live = s.metric("wasmpool_instances_live")
    s.stop()
    growth = (rss1 - rss0) / rss0
    row = {"guest": guest.name, "flags": " ".join(flags) or "defaults", "requests": done, "errors": errors,
           "seconds": round(secs), "rss_after_warmup_mib": round(rss0 / 1024, 1),
           "rss_end_mib": round(rss1 / 1024, 1), "rss_growth": f"{growth:+.1%}",
           "peak_instances": int(peak), "reused_requests": int(reused), "live_after_idle": int(live)}
    print(row, flush=True)
    ok = errors == 0 and growth < 0.10 and live == 0
    return ok


def main():
    bin_, guests, cache, total = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    results = [
        soak(bin_, guests / "p3_suite.wasm", [], total, cache),
        soak(bin_, guests / "p2_hello.wasm", ["--max-instance-reuse-count", "128"], total, cache),
    ]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
