"""Item 7: the control process's footprint, idle and after many task runs.

The bench process plays the control process: it starts a FlowExecutor (fork
server up, no run yet) and notes its RSS and open file descriptors ("idle"),
then runs flows of no-op task calls until N task processes have run, noting
RSS and fds after each flow run (garbage collected first each time).

Targets: RSS growth from idle to after N tasks <= 5 MB; no fd growth.
"""

from __future__ import annotations

import gc
import sys

import common
from common import NoopFlows, Row, mib, open_fds, print_table, rss_bytes

from perfect_runner.sdk.units import format_size


def _sample() -> tuple[int, int]:
    gc.collect()
    return rss_bytes(), open_fds()


def main(quick: bool = False) -> list[Row]:
    total = 300 if quick else 2000
    per_run = 100 if quick else 250
    directory = common.work_dir("footprint")
    module = common.noop_flows_module(directory)
    runner = NoopFlows(module, per_run)
    print(f"item 7: footprint ({total} task runs)", file=sys.stderr)
    try:
        idle_rss, idle_fds = _sample()
        table = [["idle (executor started)", 0, mib(idle_rss), 0.0, idle_fds]]
        done = 0
        while done < total:
            runner.batch()
            done += per_run
            rss, fds = _sample()
            table.append([f"after run {done // per_run}", done, mib(rss), mib(rss - idle_rss),
                          fds])
    finally:
        runner.close()
    end_rss, end_fds = _sample()
    print_table(f"7. Control-process footprint ({total} task runs, {per_run} per flow run)",
                ["point", "tasks run", "RSS MiB", "growth MiB", "open fds"], table)
    first_rss = table[1][2]
    growth = table[-1][2] - table[0][2]
    after_first = table[-1][2] - first_rss
    fd_growth = table[-1][4] - idle_fds
    return [
        Row("7 footprint", "control RSS idle", "-", format_size(idle_rss), None),
        Row("7 footprint", f"RSS growth idle -> after {total} tasks", "<= 5 MB",
            format_size(int(growth * (1 << 20))), growth * (1 << 20) <= 5e6),
        Row("7 footprint", "RSS growth after first run -> end", "-",
            format_size(int(after_first * (1 << 20))), None),
        Row("7 footprint", "open fds idle -> after", "no growth",
            f"{idle_fds} -> {table[-1][4]} ({fd_growth:+d})", fd_growth <= 0),
        Row("7 footprint", "open fds after executor.close()", "-", str(end_fds), None),
    ]


if __name__ == "__main__":
    common.print_rows(main("--quick" in sys.argv))
