"""Benchmark session hooks: machine facts in the JSON, ratios against the baseline.

Within a pytest-benchmark group (one op, one shape), the provider named
"eager" is the baseline; every row gets ``speedup_vs_eager`` (baseline median
/ row median) and, where the bench set ``bytes_moved``, ``gbps`` (bytes moved
/ median). Both go into the saved JSON and a table at the end of the run.
"""

from __future__ import annotations

import registry

BASELINE = "eager"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["utilgen"] = registry.machine_info()


def _derive(benchmarks):
    baselines = {}
    for bench in benchmarks:
        if bench.extra_info.get("provider") == BASELINE:
            baselines[bench.group] = bench.stats.median
    rows = []
    for bench in benchmarks:
        median = bench.stats.median
        base = baselines.get(bench.group)
        if base is not None and median > 0:
            bench.extra_info["speedup_vs_eager"] = round(base / median, 3)
        moved = bench.extra_info.get("bytes_moved")
        if moved and median > 0:
            bench.extra_info["gbps"] = round(moved / median / 1e9, 2)
        rows.append(bench)
    return rows


def pytest_benchmark_update_json(config, benchmarks, output_json):
    by_name = {b["fullname"]: b for b in output_json["benchmarks"]}
    session = config._benchmarksession
    for bench in _derive(session.benchmarks):
        entry = by_name.get(bench.fullname)
        if entry is not None:
            entry["extra_info"] = dict(bench.extra_info)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = _derive(session.benchmarks)
    write = terminalreporter.write_line
    write("")
    write(
        f"utilgen ratios vs '{BASELINE}' (median times, same run): {registry.machine_info()['device']}, "
        f"{registry.machine_info()['torch_threads']} threads"
    )
    write(f"{'group':<48} {'provider':<22} {'median ms':>10} {'x eager':>8} {'GB/s':>7} {'peak MiB':>9}")
    for bench in sorted(rows, key=lambda b: (b.group or "", b.stats.median)):
        info = bench.extra_info
        peak = info.get("peak_memory_bytes")
        write(
            f"{(bench.group or '')[:48]:<48} {str(info.get('provider'))[:22]:<22} {bench.stats.median * 1e3:>10.3f} "
            f"{info.get('speedup_vs_eager', float('nan')):>8.2f} {info.get('gbps', float('nan')):>7.2f} "
            f"{(peak / 2**20) if peak is not None else float('nan'):>9.2f}"
        )
