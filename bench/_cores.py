"""A task call and the fork floor side by side on a given set of cores.

    taskset -c 0 python bench/_cores.py CALLS ROUNDS FLOWS_MODULE

runs in the affinity `taskset` gave it (the fork server, the flow and task
processes and the floor's helper all inherit it) and prints one JSON object:
{"pr": [...], "pr_paced": [...], "fork": [...]}, seconds per call, interleaved
round by round. "pr_paced" is the same call with 5 ms of the flow body's own
between calls (its pauses are not timed): the spares are ready and the cores
idle when a call comes, so it shows the call's own path, not its throughput.
`start_overhead` runs it on one core and on two to show what idle cores buy:
with one core every fork and every hop is on the call's path; with two the
next spare's fork runs beside the call.
"""

from __future__ import annotations

import json
import sys

from common import NoopFlows, helper, interleave


def main(calls: int, rounds: int, module: str) -> dict[str, list[float]]:
    runner = NoopFlows(module, calls)
    paced = NoopFlows(module, calls, flow="noop_calls_paced")
    try:
        runner.batch()  # warm-up: first run, not timed
        return interleave({"pr": runner.batch, "pr_paced": paced.batch,
                           "fork": lambda: helper(["fork", str(calls), module])},
                          rounds, progress=False)
    finally:
        runner.close()
        paced.close()


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])))
