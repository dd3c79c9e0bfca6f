"""Item 2: task start does not depend on how much memory the flow holds.

The same no-op task calls as item 1 (default start method), interleaved:

- small: the plain flows module, a flow body holding nothing;
- flow body holding 1 GiB: bytearray(1 << 30), every page touched, before the calls;
- heavy imports: a flows module that imports asyncio, decimal, email,
  http.client, json and xml.etree.ElementTree (so the fork server and every
  child carry them).

Target: the median of each is within 10 % of the small case.

For orientation, two more rows without a target: a flows module that holds
1 GiB at import time (then the fork server itself is big and every fork
copies its page tables), and the os.fork floor from a parent holding 1 GiB.
"""

from __future__ import annotations

import sys

import common
from common import TIMING_HEADERS, NoopFlows, Row, Stats, helper, interleave, print_table

LABELS = {
    "small": "small flow, plain module",
    "body_1gib": "flow body holding 1 GiB",
    "heavy_imports": "module with heavy imports",
    "module_1gib": "module holding 1 GiB (fork server big)",
    "fork_small": "os.fork floor, small parent",
    "fork_1gib": "os.fork floor, parent holding 1 GiB",
}


def main(quick: bool = False) -> list[Row]:
    rounds = 2 if quick else 4
    calls = 60 if quick else 500
    few = 15 if quick else 50
    directory = common.work_dir("memory")
    plain = common.noop_flows_module(directory)
    heavy = common.noop_flows_module(directory, "heavy_flows", imports=common.HEAVY_IMPORTS)
    big = common.noop_flows_module(directory, "big_flows", ballast=True)
    runners = {
        "small": NoopFlows(plain, calls),
        "body_1gib": NoopFlows(plain, calls, flow="noop_calls_holding_1gib"),
        "heavy_imports": NoopFlows(heavy, calls),
        "module_1gib": NoopFlows(big, few),
    }
    try:
        for runner in runners.values():
            runner.batch()  # warm-up, not timed
        variants = {name: runner.batch for name, runner in runners.items()}
        variants["fork_small"] = lambda: helper(["fork", str(few), plain])
        variants["fork_1gib"] = lambda: helper(["fork", str(few), plain, "--ballast-gib", "1"])
        print(f"item 2: independence from memory size ({rounds} rounds, interleaved)",
              file=sys.stderr)
        pooled = interleave(variants, rounds)
    finally:
        for runner in runners.values():
            runner.close()

    print_table(f"2. Task start vs memory size: time per no-op task call seen by the flow body "
                f"({rounds} rounds; {calls} calls per round, {few} for the last three rows; "
                f"'x floor' is relative to the small case)",
                TIMING_HEADERS, common.timing_rows(pooled, "small", LABELS))

    small = Stats.of(pooled["small"]).median
    rows = []
    for name, label in (("body_1gib", "flow body 1 GiB"), ("heavy_imports", "heavy imports")):
        median = Stats.of(pooled[name]).median
        change = median / small - 1
        rows.append(Row("2 memory", f"{label} vs small (median)", "within +-10 %",
                        f"{change * 100:+.1f} % ({median * 1000:.2f} ms)", abs(change) <= 0.10))
    for name, label in (("module_1gib", "module holding 1 GiB"),
                        ("fork_1gib", "os.fork floor, 1 GiB parent")):
        median = Stats.of(pooled[name]).median
        rows.append(Row("2 memory", f"{label} (median)", "-", f"{median * 1000:.1f} ms", None))
    return rows


if __name__ == "__main__":
    common.print_rows(main("--quick" in sys.argv))
