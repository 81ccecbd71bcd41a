"""Print saved benchmark results as Markdown: ``python benchmarks/summarize.py benchmarks/results/*.json``.

One table per file: group, provider, median, speed-up over the group's
"eager" row, GB/s and peak memory, under the machine facts the file recorded.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def summarize(path: Path) -> str:
    data = json.loads(path.read_text())
    machine = data["machine_info"].get("utilgen", {})
    cpu = data["machine_info"].get("cpu", {}).get("brand_raw", "")
    lines = [
        f"### {path.name}",
        "",
        f"{machine.get('device')} {cpu}, {machine.get('cpu_count')} cores, "
        f"{machine.get('torch_threads')} torch threads, "
        f"OMP_WAIT_POLICY={machine.get('omp_wait_policy')}, torch {machine.get('torch')}, "
        f"triton {machine.get('triton')}; "
        f"run {data.get('datetime', '')[:19]}",
        "",
        "| group | provider | median ms | x eager | GB/s | peak MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rows = sorted(data["benchmarks"], key=lambda b: (b["group"] or "", b["stats"]["median"]))
    for bench in rows:
        info = bench["extra_info"]
        peak = info.get("peak_memory_bytes")
        lines.append(
            f"| {bench['group']} | {info.get('provider')} | {bench['stats']['median'] * 1e3:.3f} | "
            f"{_cell(info.get('speedup_vs_eager'), '.2f')} | {_cell(info.get('gbps'), '.1f')} | "
            f"{_cell(peak / 2**20 if peak is not None else None, '.1f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(summarize(Path(p)) for p in sys.argv[1:]))
