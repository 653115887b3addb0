#!/usr/bin/env python3
"""Turns a benchmark run (results.json from benches/bench.py and the
Criterion output) into docs/benchmarks.md and an SVG chart.

    report.py RESULTS.json CRITERION.txt OUT.md OUT.svg
"""

import json
import re
import sys
from pathlib import Path

# The targets of issue 14: 1.1x `wasmtime serve` everywhere (1.5x for
# interpreter guests with a fresh instance per request); hello with reuse
# 0.7x native for WASIp2 and 0.6x for WASIp3; cold start with the cache
# 10 ms for hello and 60 ms for the Python guest.
TARGETS = {
    "vs_wasmtime": 1.1,
    "vs_wasmtime_fresh_interpreter": 1.5,
    "vs_native_p2": 0.7,
    "vs_native_p3": 0.6,
    "cold_hello_ms": 10,
    "cold_python_ms": 60,
}


def fmt(x, nd=0):
    return f"{x:,.{nd}f}"


def ok(flag):
    return "yes" if flag else "**no**"


def svg_chart(rows, path):
    """Grouped bars: requests/s per scenario for the three servers."""
    servers = [("wasmpool", "#2b6cb0"), ("wasmtime", "#dd6b20"), ("native", "#718096")]
    w_label, bar, gap, group_gap = 330, 16, 2, 14
    top = max(max(r["rps"].get(k, 0) for k, _ in servers) for r in rows)
    width = 900
    scale = (width - w_label - 90) / top
    height = 40 + len(rows) * (3 * (bar + gap) + group_gap) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           '<text x="10" y="20" font-size="14" font-weight="bold">Requests/s per scenario '
           '(median of interleaved rounds)</text>']
    y = 40
    for r in rows:
        out.append(f'<text x="{w_label - 8}" y="{y + 1.5 * (bar + gap) + 4}" text-anchor="end">'
                   f'{r["scenario"]}</text>')
        for k, color in servers:
            v = r["rps"].get(k)
            if v is not None:
                out.append(f'<rect x="{w_label}" y="{y}" width="{v * scale:.1f}" height="{bar}" fill="{color}"/>')
                out.append(f'<text x="{w_label + v * scale + 4:.1f}" y="{y + bar - 4}">{fmt(v)}</text>')
            y += bar + gap
        y += group_gap
    lx = w_label
    for k, color in servers:
        name = {"wasmtime": "wasmtime serve 48.0.8", "native": "native hyper"}.get(k, k)
        out.append(f'<rect x="{lx}" y="{y}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{lx + 16}" y="{y + 10}">{name}</text>')
        lx += 190
    out.append("</svg>")
    Path(path).write_text("\n".join(out) + "\n")


def criterion_rows(text):
    rows = []
    for m in re.finditer(r"^(\S[^\n]*?)\s*\n?\s+time:\s+\[([^\]]+)\]", text, re.M):
        name = m.group(1).strip()
        parts = m.group(2).split()
        rows.append((name, f"{parts[2]} {parts[3]}"))  # the estimate
    return rows


def main():
    res = json.loads(Path(sys.argv[1]).read_text())
    crit = Path(sys.argv[2]).read_text() if Path(sys.argv[2]).exists() else ""
    md, svg = sys.argv[3], sys.argv[4]
    m = res["machine"]
    L = []
    L.append("# Benchmarks\n")
    L.append("Produced by `benches/run.sh` (the whole file, including the chart); "
             "rerun it to replace this page. Everything below comes from one run on one machine.\n")
    L.append(f"- Date: {res['date']}; run took {res['duration_s'] // 60} min.")
    L.append(f"- Machine: {m['cpus']} CPUs ({m['cpu']}), {m['mem_gib']} GiB, Linux {m['kernel']}; "
             "shared and noisy, so only ratios measured in the same run are compared.")
    v = res["versions"]
    L.append(f"- Servers: {v['wasmpool']}, {v['wasmtime']} (`cargo install --locked wasmtime-cli@48.0.8`), "
             "native hyper 1 (`benches/native_hello.rs`) answering the same bytes as the hello guest.")
    L.append(f"- Load: {v['wrk']} `wrk -t1 -cN -dSs` (closed loop) for throughput; {v['oha']} "
             "with `-q RATE --latency-correction` (constant rate) for latency.")
    L.append(f"- Method: for each scenario the servers run side by side; each round measures wasmpool, "
             f"wasmtime serve, wasmtime serve with `-W timeout=30s`, native (hello scenarios) and wasmpool again, {res['seconds']} s each, "
             f"{res['rounds']} rounds; figures are medians, ratios are medians of per-round ratios. "
             "The A/A column is wasmpool's second measurement over its first in the same round "
             "(min..max): a ratio inside that spread is noise.")
    L.append("- Identical knobs: the flags in the table are passed to both wasmpool and `wasmtime serve` "
             "(they share the names); everything else is each server's default. `wasmtime serve` runs "
             "twice: at its defaults, and with `-W timeout=30s`, the protection wasmpool's default "
             "30 s request timeout gives (epoch checks compiled into the guest, so a spinning guest "
             "can be stopped); without it `wasmtime serve` compiles no epoch checks. The targets "
             "are judged at equal protection. wasmpool runs at the defaults a user gets, logging included: "
             "its access log (on by default) goes to stderr, which the harness keeps in a file.\n")
    L.append("![requests/s per scenario](benchmarks.svg)\n")
    L.append("## Throughput\n")
    L.append("| scenario | flags | conns | wasmpool req/s | wasmtime serve -W timeout req/s | "
             "wasmtime serve (defaults) req/s | native req/s | "
             "wasmpool / wasmtime -W timeout | wasmpool / wasmtime defaults | wasmpool / native | "
             "wasmtime / native | A/A spread | wasmpool errors | peak instances |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["throughput"]:
        rps = r["rps"]
        L.append(
            f"| {r['scenario']} | `{' '.join(r['flags']) or 'defaults'}` {r['path']} | {r['connections']} | "
            f"{fmt(rps['wasmpool'])} | {fmt(rps['wasmtime_timeout'])} | {fmt(rps['wasmtime'])} | "
            f"{fmt(rps['native']) if 'native' in rps else '–'} | "
            f"**{r['vs_wasmtime_timeout']:.2f}x** | {r['vs_wasmtime']:.2f}x | "
            f"{('%.2fx' % r['vs_native']) if 'vs_native' in r else '–'} | "
            f"{('%.2fx' % r['wasmtime_vs_native']) if 'wasmtime_vs_native' in r else '–'} | "
            f"{r['aa'][0]:.2f}..{r['aa'][1]:.2f} | {r['wasmpool_errors']} | {r['wasmpool_peak_instances']:.0f} |")
    L.append("")
    L.append("## Targets\n")
    L.append("| target | result | met |")
    L.append("|---|---|---|")
    for r in res["throughput"]:
        note = ""
        m = re.search(r"sleep/(\d+)", r["path"])
        if m:
            # A closed loop of N clients on a handler that sleeps S ms cannot
            # exceed N / S requests/s, whatever the server.
            bound = r["connections"] / (int(m.group(1)) / 1000)
            if TARGETS["vs_wasmtime"] * r["rps"]["wasmtime_timeout"] > bound:
                note = (f" (unreachable: {r['connections']} clients on a {m.group(1)} ms sleep "
                        f"cap any server at {fmt(bound)} req/s; wasmtime serve is at "
                        f"{r['rps']['wasmtime_timeout'] / bound:.0%} of that)")
        want = TARGETS["vs_wasmtime"]
        if r["guest"].startswith(("py_", "js_")) and "fresh" in r["scenario"]:
            want = TARGETS["vs_wasmtime_fresh_interpreter"]
        L.append(f"| {r['scenario']}: at least {want}x wasmtime serve at equal protection | "
                 f"{r['vs_wasmtime_timeout']:.2f}x (defaults: {r['vs_wasmtime']:.2f}x){note} | "
                 f"{ok(r['vs_wasmtime_timeout'] >= want)} |")
    for r in res["throughput"]:
        if "vs_native" in r and "fresh" not in r["scenario"]:
            want = TARGETS["vs_native_p3" if r["guest"].startswith("p3") else "vs_native_p2"]
            L.append(f"| {r['scenario']}: at least {want}x native | {r['vs_native']:.2f}x | "
                     f"{ok(r['vs_native'] >= want)} |")
    io = next((r for r in res["throughput"] if "I/O-bound" in r["scenario"]), None)
    if io:
        share = io["wasmpool_peak_instances"] / io["connections"]
        L.append(f"| I/O-bound 40 ms: peak live instances at most 40% of requests in flight | "
                 f"{io['wasmpool_peak_instances']:.0f} instances for {io['connections']} in flight "
                 f"({share:.0%}) | {ok(share <= 0.4)} |")
    if "io_peaks" in res:
        iop = res["io_peaks"]
        peaks = sorted(r["peak"] for r in iop["runs"])
        good = sum(1 for x in peaks if x <= 0.4 * iop["connections"])
        bound = iop["connections"] / (iop["sleep_ms"] / 1000)
        rps = sorted(r["rps"] for r in iop["runs"])
        L.append(f"| I/O-bound 40 ms, {len(peaks)} runs on new processes: peak live instances at most "
                 f"40% of {iop['connections']} in flight in every run | peaks {', '.join('%.0f' % x for x in peaks)}; "
                 f"{good} of {len(peaks)} runs within; {fmt(rps[0])}..{fmt(rps[-1])} req/s "
                 f"(the limit is {fmt(bound)}) | {ok(good == len(peaks))} |")
    for c in res.get("cold_start", []):
        limit = TARGETS["cold_hello_ms"] if "hello" in c["guest"] else TARGETS["cold_python_ms"]
        L.append(f"| cold start with cache, {c['guest']}: at most {limit} ms | {c['with cache']:.1f} ms | "
                 f"{ok(c['with cache'] <= limit)} |")
    if "api_push" in res:
        a = res["api_push"]
        L.append(f"| C API push at least 0.9x the Rust API (host woken per completion) | {a['ratio']:.3f}x "
                 f"(refilling in batches of 16: {a.get('ratio_batch16', 0):.2f}x) | {ok(a['ratio'] >= 0.9)} |")
    L.append("")
    if "latency" in res:
        L.append("## Latency at a constant rate\n")
        rate = res["latency"][0]["rate"]
        L.append(f"p2 hello with `--max-instance-reuse-count 128`, {fmt(rate)} requests/s (half of the "
                 "slower server's closed-loop throughput), 16 connections, 10 s, latency corrected for "
                 "coordinated omission.\n")
        L.append("| server | p50 | p99 | success |")
        L.append("|---|---|---|---|")
        for r in res["latency"]:
            L.append(f"| {r['server']} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['success_rate']:.1%} |")
        L.append("")
    if "cold_start" in res:
        L.append("## Cold start\n")
        L.append("Time from starting the process to the first 200: medians of 5 starts without the cache "
                 "and of 21 with it, the quartiles (25%..75%) beside. \"no cache\" compiles "
                 "the component; \"with cache\" loads it from wasmpool's compile cache; \"socket activation\" "
                 "is measured from connecting to a socket held by `systemd-socket-activate`, which starts "
                 "wasmpool on that connection.\n")
        L.append("| guest | no cache | with cache | socket activation, with cache |")
        L.append("|---|---|---|---|")
        for c in res["cold_start"]:
            def q(key):
                return " (%.1f..%.1f)" % tuple(c[key]) if key in c else ""
            L.append(f"| {c['guest']} | {c['no cache']:.1f} ms | {c['with cache']:.1f} ms"
                     f"{q('with cache quartiles')} | {c['socket activation, with cache']:.1f} ms"
                     f"{q('socket activation quartiles')} |")
        L.append("")
    if "memory" in res:
        L.append("## Memory\n")
        L.append("RSS growth per live instance: 48 concurrent `/sleep/3000` requests with one request per "
                 "instance at a time, RSS and live instances read while they sleep.\n")
        L.append("| guest | live instances | idle RSS | busy RSS | per instance |")
        L.append("|---|---|---|---|---|")
        for r in res["memory"]:
            L.append(f"| {r['guest']} | {r['live']:.0f} | {r['idle_rss_kib'] / 1024:.1f} MiB | "
                     f"{r['busy_rss_kib'] / 1024:.1f} MiB | {r['kib_per_instance']:.0f} KiB |")
        L.append("")
    if "api_push" in res:
        a = res["api_push"]
        L.append("## C API against the Rust API\n")
        L.append("100,000 `GET /` to the p3 hello guest, at most 64 in flight, whole bodies collected: "
                 "`ffi/bench/push_bench.c` (push + completion callbacks on engine threads; its counters are "
                 "atomics and it sleeps on a semaphore, so it adds no lock of its own) against "
                 "`benches/api_push.rs` (`Pool::handle` on a tokio runtime of the same size). The C host "
                 "runs twice: woken for every completion to push the next request (as the Rust loop "
                 "takes one permit at a time), and sleeping until 16 have completed, then pushing 16 (as "
                 "an event loop takes completions in batches). "
                 f"Medians of {len(a['rounds']['c'])} interleaved rounds; ratios are medians of per-round ratios.\n")
        L.append("| API | req/s | / Rust |")
        L.append("|---|---|---|")
        L.append(f"| C, woken per completion | {fmt(a['c_rps'])} | {a['ratio']:.2f}x |")
        if "c_batch16_rps" in a:
            L.append(f"| C, refilling in batches of 16 | {fmt(a['c_batch16_rps'])} | {a['ratio_batch16']:.2f}x |")
        L.append(f"| Rust | {fmt(a['rust_rps'])} | 1.00x |")
        L.append("")
    if "front" in res:
        L.append("## The HTTP front: TLS and HTTP/2 beside HTTP/1.1\n")
        L.append("One wasmpool process serving the p2 hello guest (reuse 128) on a plain and a TLS listener "
                 "(rustls, ECDSA P-256 certificate); h2load with 16 connections and one request at a time on each "
                 f"(`-m1`, so every protocol sees the same concurrency), {res['seconds']} s per protocol, "
                 f"{len(res['front'][0]['rounds'])} interleaved rounds; medians, and the median of per-round ratios "
                 "to plain HTTP/1.1.\n")
        L.append("| protocol | req/s | vs HTTP/1.1 | failed |")
        L.append("|---|---|---|---|")
        for r in res["front"]:
            L.append(f"| {r['protocol']} | {fmt(r['rps'])} | {r['vs_h1']:.2f}x | {r['failed']} |")
        L.append("")
    if "telemetry" in res:
        L.append("## Access log and traces: what they cost\n")
        L.append("Four wasmpool processes side by side per guest, each at its defaults except as the row says "
                 "(stderr, where the access log goes by default, is a file); wrk with 16 connections, "
                 f"{res['seconds']} s per row, {len(res['telemetry'][0]['variants'][0]['rounds'])} interleaved "
                 "rounds; medians, and the median of per-round ratios. The export row sends every request's spans "
                 "(server span and children) over OTLP/HTTP to a local receiver that reads each export and "
                 "answers 200 at once (nginx, one worker: a collector's receiving without its processing; "
                 "on two cores the receiver's CPU is taken from the server).\n")
        L.append("| guest | row | req/s | errors |")
        L.append("|---|---|---|---|")
        for t in res["telemetry"]:
            for v in t["variants"]:
                L.append(f"| {t['scenario']} | {v['label']} | {fmt(v['rps'])} | {v['errors']} |")
        L.append("")
        L.append("| guest | defaults / both off (target ≥ 0.97) | met | propagation / defaults | "
                 "export / defaults (target ≥ 0.90) | met | spans exported | spans dropped |")
        L.append("|---|---|---|---|---|---|---|---|")
        for t in res["telemetry"]:
            L.append(f"| {t['scenario']} | {t['defaults_vs_off']:.3f}x | {ok(t['defaults_vs_off'] >= 0.97)} | "
                     f"{t['propagate_vs_defaults']:.3f}x | {t['export_vs_defaults']:.3f}x | "
                     f"{ok(t['export_vs_defaults'] >= 0.90)} | {fmt(t['spans_exported'])} | "
                     f"{fmt(t['spans_dropped'])} |")
        L.append("")
    if "nginx" in res:
        L.append("## nginx: the module, proxy_pass to wasmpool serve, wasmpool serve alone\n")
        L.append("Side by side per guest: nginx 1.22 (Debian's, `worker_processes auto`, access log on, to a "
                 "file) with `ngx_http_wasmpool_module`; the same nginx with `proxy_pass` to `wasmpool serve` "
                 "on a unix socket with upstream `keepalive 64` (HTTP/1.1, the way to put nginx in front of "
                 "wasmpool without the module); and `wasmpool serve` alone on TCP. Each at its defaults except "
                 "the reuse count the row names (the module requests start on the worker's thread, "
                 "`wasmpool_inline on`, its default; the `inline off` column hands every request to the "
                 "engine threads); wrk with 16 connections, "
                 f"{res['seconds']} s per row, {len(res['nginx'][0]['rounds']['module'])} interleaved rounds; "
                 "medians, and the median of per-round ratios.\n")
        L.append("| guest | nginx + module | module, inline off | nginx proxy_pass | wasmpool serve | "
                 "module / proxy_pass (target ≥ 1.3) | met | module / serve (target ≥ 0.9) | met | "
                 "module / inline off | errors |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for t in res["nginx"]:
            off = t["rps"].get("noinline")
            vs_off = f"{t['module_vs_noinline']:.2f}x" if off else "–"
            L.append(f"| {t['scenario']} | {fmt(t['rps']['module'])} | {fmt(off) if off else '–'} | "
                     f"{fmt(t['rps']['proxy'])} | "
                     f"{fmt(t['rps']['serve'])} | {t['module_vs_proxy']:.2f}x | {ok(t['module_vs_proxy'] >= 1.3)} | "
                     f"{t['module_vs_serve']:.2f}x | {ok(t['module_vs_serve'] >= 0.9)} | "
                     f"{vs_off} | "
                     f"{sum(t['errors'].values())} |")
        L.append("")
    rows = criterion_rows(crit)
    if rows:
        L.append("## Micro-benchmarks (Criterion, `cargo bench --bench engine`)\n")
        L.append("| benchmark | time |")
        L.append("|---|---|")
        for name, t in rows:
            L.append(f"| {name} | {t} |")
        L.append("")
    notes = Path(__file__).with_name("notes.md")
    if notes.exists():
        L.append(notes.read_text())
    L.append("## Commands\n")
    L.append("```sh\nbenches/run.sh            # everything above (first run: ~25 min more to install wasmtime-cli)\n"
             "benches/run.sh --only 'p2 hello' --rounds 3   # a subset of the throughput scenarios\n```\n")
    Path(md).write_text("\n".join(L) + "\n")
    svg_chart(res["throughput"], svg)


if __name__ == "__main__":
    main()
