"""Run every benchmark in sequence and summarise target vs measured.

    python bench/run_all.py [--quick] [--only NAME ...]

Each benchmark runs in its own fresh interpreter (so one item's memory and
garbage do not show up in another's RSS figures); it prints its own table and
hands back its rows as JSON. The final table lists every target, what was
measured, and pass/MISS.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import Row

# In the order the issue lists them; others append theirs here.
BENCHMARKS = ["start_overhead", "memory_size", "output_throughput", "footprint", "faults",
              "http_cost", "heartbeat_load", "supervision_latency", "scale_out", "delivery",
              "payload", "many_runs"]


def run_one(name: str, quick: bool) -> tuple[list[Row], float]:
    """Run bench/<name>.py's main() in a fresh interpreter; its rows and wall time."""
    with tempfile.NamedTemporaryFile(suffix=".json", prefix=f"pr-bench-{name}-") as rows_file:
        command = [sys.executable, __file__, "--child", name, "--rows-json", rows_file.name]
        if quick:
            command.append("--quick")
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=common.REPO)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            return [Row(name, "benchmark ran", "exit 0", f"exit {proc.returncode}", False)], \
                seconds
        rows = [Row(**r) for r in json.loads(Path(rows_file.name).read_text() or "[]")]
    return rows, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run just these")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rows-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        rows = importlib.import_module(args.child).main(args.quick)
        Path(args.rows_json).write_text(json.dumps([r.to_json() for r in rows]))
        return 0

    if common.PYCACHE_NOTE:
        print(common.PYCACHE_NOTE, flush=True)
    started = time.perf_counter()
    all_rows: list[Row] = []
    timings = []
    for name in args.only or BENCHMARKS:
        rows, seconds = run_one(name, args.quick)
        all_rows.extend(rows)
        timings.append(f"{name} {seconds:.0f} s")
    total = time.perf_counter() - started
    mode = "quick" if args.quick else "full"
    common.print_rows(all_rows, f"Summary ({mode}; {', '.join(timings)}; "
                                f"total {total:.0f} s)")
    misses = [r for r in all_rows if r.passed is False]
    print(f"{len(misses)} target(s) missed" if misses else "all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
