"""Item 3: output throughput through the control process into the run's log file.

One task writes N lines of 50 bytes (plus the newline) to stdout, in blocks of
1,000 lines, so the task itself is not the bottleneck: its pipe fills and it
waits for the control process. The listener is `LogFileListener` (the local
run log file, on the temp dir's filesystem) wrapped to count lines and sample
the control process's RSS at every batch of output.

lines/s = lines / (task_started .. task_finished), as the control process
sees it (includes starting the task process and the final flush).
RSS growth = the highest RSS sampled during the task minus the RSS just
before the run.

Variants, interleaved: log file listener (the target), a listener that only
counts (the pipeline without formatting and writing), and the log file with a
task that calls print() once per line (how fast a naive task can produce).
Targets: >= 500,000 lines/s into the log file; RSS growth <= 50 MB.
"""

from __future__ import annotations

import gc
import shutil
import sys
import time
from pathlib import Path

import common
from common import FlowExecutor, Row, Stats, execute, mib, print_table, rss_bytes

from perfect_runner.executor.events import NullListener
from perfect_runner.local.logfile import LogFileListener
from perfect_runner.sdk.units import format_size

FLOWS = '''
import os
import sys

from perfect_runner import flow, task

LINE = "x" * 50 + "\\n"


@task
def flood():
    """Write the lines in blocks of 1,000."""
    lines = int(os.environ["PR_BENCH_LINES"])
    block = LINE * 1000
    write = sys.stdout.write
    for _ in range(lines // 1000):
        write(block)
    write(LINE * (lines % 1000))


@task
def flood_print():
    """print() once per line, the naive way."""
    line = LINE[:-1]
    for _ in range(int(os.environ["PR_BENCH_LINES"])):
        print(line)


@flow()
def flood_blocks():
    flood()


@flow()
def flood_lines():
    flood_print()
'''


class _Measure:
    """Counts output lines and samples RSS between task_started and task_finished."""

    def reset(self) -> None:
        gc.collect()
        self.lines = 0
        self.rss_before = rss_bytes()
        self.rss_peak = self.rss_before
        self.started = self.finished = 0.0

    def on_started(self) -> None:
        self.started = time.perf_counter()

    def on_output(self, task: object, lines: list[str]) -> None:
        if task is not None:
            self.lines += len(lines)
            self.rss_peak = max(self.rss_peak, rss_bytes())

    def on_finished(self) -> None:
        self.rss_peak = max(self.rss_peak, rss_bytes())
        self.finished = time.perf_counter()


class MeasuredLogFile(LogFileListener, _Measure):
    def task_started(self, run, task) -> None:  # noqa: ANN001
        self.on_started()
        super().task_started(run, task)

    def task_output(self, run, task, stream, lines) -> None:  # noqa: ANN001
        super().task_output(run, task, stream, lines)
        self.on_output(task, lines)

    def task_finished(self, run, task) -> None:  # noqa: ANN001
        super().task_finished(run, task)
        self.on_finished()


class CountingOnly(NullListener, _Measure):
    def task_started(self, run, task) -> None:  # noqa: ANN001
        self.on_started()

    def task_output(self, run, task, stream, lines) -> None:  # noqa: ANN001
        self.on_output(task, lines)

    def task_finished(self, run, task) -> None:  # noqa: ANN001
        self.on_finished()


LABELS = {
    "logfile": "log file listener, block writes",
    "counting": "counting-only listener, block writes",
    "logfile_print": "log file listener, print() per line",
}


def main(quick: bool = False) -> list[Row]:
    lines = 200_000 if quick else 1_000_000
    rounds = 2 if quick else 3
    directory = common.work_dir("output")
    module = common.write_module(directory, "flood_flows", FLOWS)
    executor = FlowExecutor([module], env=common.bench_env(PR_BENCH_LINES=str(lines)))
    logs = directory / "logs"
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in LABELS}
    log_lines_checked = 0

    def batch(name: str) -> list[float]:
        nonlocal log_lines_checked
        shutil.rmtree(logs, ignore_errors=True)
        # A bound above the flood: this measures writing every line, not the cut.
        listener = (CountingOnly() if name == "counting"
                    else MeasuredLogFile(logs, max_bytes=1 << 30))
        listener.reset()
        flow = "flood_lines" if name == "logfile_print" else "flood_blocks"
        record = execute(executor, flow, listener)
        if listener.lines != lines:
            raise common.RunFailed(f"{name}: {listener.lines} lines arrived, not {lines}")
        if name == "logfile" and not log_lines_checked:
            log_lines_checked = _count_output_lines(Path(record.log_path or ""))
            if log_lines_checked != lines:
                raise common.RunFailed(f"log file has {log_lines_checked} output lines")
        seconds = listener.finished - listener.started
        results[name].append((lines / seconds, listener.rss_peak - listener.rss_before))
        return [seconds]

    try:
        warm_up = CountingOnly()
        warm_up.reset()
        execute(executor, "flood_blocks", warm_up)  # not measured
        print(f"item 3: output throughput ({rounds} rounds, interleaved)", file=sys.stderr)
        common.interleave({name: (lambda n=name: batch(n)) for name in LABELS}, rounds)
    finally:
        executor.close()
        shutil.rmtree(directory, ignore_errors=True)

    table = []
    for name, label in LABELS.items():
        rates = Stats.of([r for r, _ in results[name]])
        growth = Stats.of([g for _, g in results[name]])
        table.append([label, rates.n, rates.median / 1000, rates.min / 1000, rates.max / 1000,
                      mib(growth.median), mib(growth.max)])
    print_table(f"3. Output throughput: {lines:,} lines of 50 bytes from one task "
                f"({rounds} rounds; k lines/s through the control process; control RSS growth)",
                ["variant", "runs", "median k/s", "min k/s", "max k/s", "RSS+ med MiB",
                 "RSS+ max MiB"], table)

    rate = Stats.of([r for r, _ in results["logfile"]])
    growth = max(g for name in LABELS for _, g in results[name])
    return [
        Row("3 output", "lines/s into the log file (median)", ">= 500,000",
            f"{rate.median:,.0f}", rate.median >= 500_000),
        Row("3 output", "control RSS growth during it (max)", "<= 50 MB",
            format_size(growth), growth <= 50e6),
    ]


def _count_output_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as log:
        return sum(1 for line in log if " OUT " in line)


if __name__ == "__main__":
    common.print_rows(main("--quick" in sys.argv))
