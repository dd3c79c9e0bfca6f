"""Item 1: task start overhead, as seen by the flow body.

A flow calls a no-op task N times (local mode, no backend, a listener that does
nothing) and times each call with time.perf_counter(). Variants, interleaved
round by round:

- perfect_runner, default start method (its own fork server);
- perfect_runner --start-method spawn (fewer calls: slow);
- a plain in-process call;
- os.fork() + pipe + pickled result: the floor;
- multiprocessing.Process, fork context (for reference);
- multiprocessing.Process, forkserver as shipped, the module preloaded;
- ProcessPoolExecutor(max_tasks_per_child=1) (spawn, as 3.11 picks for it).

The baselines run in a small fresh interpreter that imported the flows
module, like perfect_runner's fork server.

Targets: default median <= 3 ms, <= 3x the fork floor, and >= 6x faster than
multiprocessing's forkserver.
"""

from __future__ import annotations

import sys

import common
from common import TIMING_HEADERS, NoopFlows, Row, Stats, helper, interleave, print_table

LABELS = {
    "pr_default": "perfect_runner (forkserver)",
    "pr_spawn": "perfect_runner --start-method spawn",
    "inprocess": "plain in-process call",
    "fork": "os.fork + pipe (floor)",
    "mp_fork": "mp.Process, fork",
    "mp_forkserver": "mp.Process, forkserver+preload",
    "pool_mtpc1": "ProcessPool(max_tasks_per_child=1)",
}


def main(quick: bool = False) -> list[Row]:
    rounds = 2 if quick else 5
    calls = {"pr_default": 100 if quick else 500, "pr_spawn": 8 if quick else 30,
             "inprocess": 100 if quick else 500, "fork": 100 if quick else 500,
             "mp_fork": 100 if quick else 300, "mp_forkserver": 15 if quick else 80,
             "pool_mtpc1": 8 if quick else 30}
    directory = common.work_dir("start")
    module = common.noop_flows_module(directory)
    default = NoopFlows(module, calls["pr_default"])
    spawn = NoopFlows(module, calls["pr_spawn"], "spawn")
    try:
        default.batch()  # warm-up: first run, not timed
        variants = {"pr_default": default.batch, "pr_spawn": spawn.batch}
        for name in ("inprocess", "fork", "mp_fork", "mp_forkserver", "pool_mtpc1"):
            variants[name] = lambda n=name: helper([n, str(calls[n]), module])
        print(f"item 1: task start overhead ({rounds} rounds, interleaved)", file=sys.stderr)
        pooled = interleave(variants, rounds)
    finally:
        default.close()
        spawn.close()

    calls_note = ", ".join(f"{k}={v}" for k, v in calls.items())
    print_table(f"1. Task start overhead: time per no-op task call seen by the flow body "
                f"({rounds} rounds; calls per round: {calls_note})",
                TIMING_HEADERS, common.timing_rows(pooled, "fork", LABELS))

    pr = Stats.of(pooled["pr_default"]).median
    floor = Stats.of(pooled["fork"]).median
    mpfs = Stats.of(pooled["mp_forkserver"]).median
    rows = [
        Row("1 start", "default median per task", "<= 3 ms", f"{pr * 1000:.2f} ms",
            pr <= 0.003),
        Row("1 start", "default median / fork floor", "<= 3.0x", f"{pr / floor:.2f}x",
            pr / floor <= 3.0),
        Row("1 start", "mp forkserver / default", ">= 6.0x", f"{mpfs / pr:.2f}x",
            mpfs / pr >= 6.0),
        Row("1 start", "spawn median per task", "-",
            f"{Stats.of(pooled['pr_spawn']).median * 1000:.1f} ms", None),
    ]
    return rows


if __name__ == "__main__":
    common.print_rows(main("--quick" in sys.argv))
