"""Item 1: task start overhead, as seen by the flow body.

A flow calls a no-op task N times (local mode, no backend, a listener that does
nothing) and times each call with time.perf_counter(). Variants, interleaved
round by round:

- perfect_runner, default start method (its own fork server), in the sandbox
  (`--sandbox namespace`: the fork server is init of its own PID and mount
  namespace) and without it (`--sandbox off`);
- perfect_runner --start-method spawn (fewer calls: slow);
- a plain in-process call;
- os.fork() + pipe + pickled result: the floor;
- multiprocessing.Process, fork context (for reference);
- multiprocessing.Process, forkserver as shipped, the module preloaded;
- ProcessPoolExecutor(max_tasks_per_child=1) (spawn, as 3.11 picks for it);
- RQ: N no-op jobs on a Redis-backed rq Queue run by a real rq Worker
  (`Worker.work(burst=True)`, a work horse forked per job) against a
  redis-server the bench starts; one sample per round = batch time / N, from
  enqueue of the first job to the burst worker's return (see _rq_bench.py).
  Without redis-server or rq it is reported as skipped.

The baselines run in a small fresh interpreter that imported the flows
module, like perfect_runner's fork server.

Targets: default median <= 3 ms, <= 3x the fork floor, and >= 6x faster than
multiprocessing's forkserver and than RQ; issue 13: the median at most the
fork floor (1.0x) and below multiprocessing.Process(fork), in the same rounds;
and the same at most 1.0x when the flow body does 5 ms of its own work between
calls ("paced"), so a core is idle when a call comes: the call's own path, not
the machine's throughput (a tight loop of no-op calls on two cores is bound by
the CPU all processes spend per call; see docs/benchmarks.md).

Then the same no-op call and the fork floor side by side under `taskset` on
one core and on two (`_cores.py`): what idle cores buy a task call.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _rq_bench
import common
from common import TIMING_HEADERS, NoopFlows, Row, Stats, helper, interleave, print_table

from perfect_runner.isolation import sandbox

LABELS = {
    "pr_default": "perfect_runner (forkserver, sandbox)",
    "pr_nosandbox": "perfect_runner (forkserver, --sandbox off)",
    "pr_paced": "perfect_runner, paced (5 ms of flow body between calls)",
    "pr_spawn": "perfect_runner --start-method spawn",
    "inprocess": "plain in-process call",
    "fork": "os.fork + pipe (floor)",
    "mp_fork": "mp.Process, fork",
    "mp_forkserver": "mp.Process, forkserver+preload",
    "pool_mtpc1": "ProcessPool(max_tasks_per_child=1)",
    "rq": "rq Worker, fork per job (per-job, per batch)",
}


class RqVariant:
    """The RQ baseline as an interleaved variant: one batch in each of its first `rounds` rounds.

    `reason` says why it is not measured (skipped); `error` why a batch failed.
    """

    def __init__(self, jobs: int, rounds: int, module: str, directory: Path) -> None:
        self.jobs, self.rounds, self.module = jobs, rounds, module
        self.done = 0
        self.server = None
        self.error = ""
        self.reason = _rq_bench.unavailable() or ""
        if not self.reason:
            try:
                self.server = _rq_bench.RedisServer(directory)
            except (OSError, RuntimeError) as exc:
                self.reason = str(exc)

    def batch(self) -> list[float]:
        if self.done >= self.rounds or self.error:
            return []
        self.done += 1
        try:
            return _rq_bench.batch(self.jobs, self.module, self.server.port)
        except Exception as exc:  # reported in the table; the other variants go on
            self.error = str(exc)
            return []

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def main(quick: bool = False) -> list[Row]:
    rounds = 2 if quick else 5
    calls = {"pr_default": 100 if quick else 500, "pr_nosandbox": 100 if quick else 500,
             "pr_paced": 100 if quick else 300,
             "pr_spawn": 8 if quick else 30,
             "inprocess": 100 if quick else 500, "fork": 100 if quick else 500,
             "mp_fork": 100 if quick else 300, "mp_forkserver": 15 if quick else 80,
             "pool_mtpc1": 8 if quick else 30}
    rq_jobs, rq_rounds = (20, 1) if quick else (100, rounds)
    directory = common.work_dir("start")
    module = common.noop_flows_module(directory)
    default = NoopFlows(module, calls["pr_default"], sandbox="namespace")
    plain = NoopFlows(module, calls["pr_nosandbox"], sandbox="off")
    paced = NoopFlows(module, calls["pr_paced"], sandbox="namespace", flow="noop_calls_paced")
    spawn = NoopFlows(module, calls["pr_spawn"], "spawn")
    rq = RqVariant(rq_jobs, rq_rounds, module, directory)
    try:
        default.batch()  # warm-up: first run, not timed
        plain.batch()
        paced.batch()
        variants = {"pr_default": default.batch, "pr_nosandbox": plain.batch,
                    "pr_paced": paced.batch, "pr_spawn": spawn.batch}
        for name in ("inprocess", "fork", "mp_fork", "mp_forkserver", "pool_mtpc1"):
            variants[name] = lambda n=name: helper([n, str(calls[n]), module])
        if not rq.reason:
            variants["rq"] = rq.batch
        print(f"item 1: task start overhead ({rounds} rounds, interleaved)", file=sys.stderr)
        pooled = interleave(variants, rounds)
    finally:
        default.close()
        plain.close()
        paced.close()
        spawn.close()
        rq.close()

    calls_note = ", ".join(f"{k}={v}" for k, v in calls.items())
    rq_note = (f"rq={rq_jobs} jobs in each of {rq_rounds} round(s), one sample per batch: "
               f"enqueue of the first -> burst worker done, / {rq_jobs}")
    table = common.timing_rows(pooled, "fork", LABELS)
    if rq.reason or rq.error:
        table = [r for r in table if r[0] != LABELS["rq"]]
        why = f"skipped: {rq.reason}" if rq.reason else f"failed: {rq.error}"
        table.append([f"{LABELS['rq']}: {why}", "-", "-", "-", "-", "-", "-"])
    print_table(f"1. Task start overhead: time per no-op task call seen by the flow body "
                f"({rounds} rounds; calls per round: {calls_note}; {rq_note})",
                TIMING_HEADERS, table)

    pr = Stats.of(pooled["pr_default"]).median
    pr_paced = Stats.of(pooled["pr_paced"]).median
    floor = Stats.of(pooled["fork"]).median
    mpfs = Stats.of(pooled["mp_forkserver"]).median
    mpf = Stats.of(pooled["mp_fork"]).median
    rows = [
        Row("1 start", "default median per task", "<= 3 ms", f"{pr * 1000:.2f} ms",
            pr <= 0.003),
        Row("1 start", "default median / fork floor", "<= 3.0x", f"{pr / floor:.2f}x",
            pr / floor <= 3.0),
        Row("1 start", "mp forkserver / default", ">= 6.0x", f"{mpfs / pr:.2f}x",
            mpfs / pr >= 6.0),
        rq_row(rq, pooled.get("rq", []), pr),
        Row("1 start", "sandbox cost per task (median, on - off)", "-",
            f"{(pr - Stats.of(pooled['pr_nosandbox']).median) * 1000:+.2f} ms", None),
        Row("1 start", "sandbox probe, once per fork server start", "-",
            f"{probe_time() * 1000:.2f} ms", None),
        Row("1 start", "spawn median per task", "-",
            f"{Stats.of(pooled['pr_spawn']).median * 1000:.1f} ms", None),
        Row("13.1 call", "default median / fork floor", "<= 1.0x",
            f"{pr / floor:.2f}x ({pr * 1000:.2f} vs {floor * 1000:.2f} ms)", pr / floor <= 1.0),
        Row("13.1 call", "default median / mp.Process(fork)", "< 1.0x",
            f"{pr / mpf:.2f}x ({mpf * 1000:.2f} ms)", pr < mpf),
        Row("13.1 call", "paced (a core idle when called) / floor", "<= 1.0x",
            f"{pr_paced / floor:.2f}x ({pr_paced * 1000:.2f} ms)", pr_paced / floor <= 1.0),
    ]
    return rows + cores_rows(module, quick)


def cores_rows(module: str, quick: bool) -> list[Row]:
    """The no-op call and the fork floor on one core, then on two: info rows."""
    calls, rounds = (100, 2) if quick else (300, 3)
    if not shutil.which("taskset") or (os.cpu_count() or 1) < 2:
        return [Row("13.1 call", "taskset 1 vs 2 cores", "-",
                    "skipped: needs taskset and 2 cores", None, skipped=True)]
    table, rows = [], []
    for cores in ("0", "0,1"):
        pooled = json.loads(subprocess.run(
            ["taskset", "-c", cores, sys.executable, str(common.BENCH_DIR / "_cores.py"),
             str(calls), str(rounds), module],
            capture_output=True, text=True, check=True, timeout=300).stdout)
        pr, floor = Stats.of(pooled["pr"]).median, Stats.of(pooled["fork"]).median
        count = len(cores.split(","))
        for name, label in (("pr", "perfect_runner"), ("pr_paced", "perfect_runner, paced"),
                            ("fork", "os.fork + pipe (floor)")):
            st = Stats.of(pooled[name])
            table.append([f"{label}, {count} core(s)", st.n, st.median * 1000, st.p95 * 1000,
                          st.min * 1000, st.max * 1000, f"{st.median / floor:.2f}x"])
        paced = Stats.of(pooled["pr_paced"]).median
        rows.append(Row("13.1 call", f"taskset {count} core(s): default / floor", "-",
                        f"{pr / floor:.2f}x ({pr * 1000:.2f} vs {floor * 1000:.2f} ms)", None))
        rows.append(Row("13.1 call", f"taskset {count} core(s): paced / floor", "-",
                        f"{paced / floor:.2f}x ({paced * 1000:.2f} ms)", None))
    print_table(f"1b. The same call pinned with taskset: cpu 0, then cpus 0,1 ({rounds} rounds "
                f"of {calls} calls each; 'paced': 5 ms of flow body between calls, not timed; "
                f"'x floor' against the floor on the same cores)",
                TIMING_HEADERS, table)
    return rows


def probe_time(repeats: int = 20) -> float:
    """Median time of the sandbox's probe (unshare, init, /proc, capabilities) from here."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        why = sandbox.probe()
        samples.append(time.perf_counter() - start)
        if why:
            return float("nan")
    return Stats.of(samples).median


def rq_row(rq: RqVariant, samples: list[float], pr: float) -> Row:
    target = ("1 start", "rq / default", ">= 6.0x")
    if rq.reason:
        return Row(*target, f"skipped: {rq.reason}", None, skipped=True)
    if rq.error or not samples:
        return Row(*target, f"failed: {rq.error or 'no samples'}", False)
    per_job = Stats.of(samples).median
    return Row(*target, f"{per_job / pr:.2f}x ({per_job * 1000:.1f} ms/job)",
               per_job / pr >= 6.0)


if __name__ == "__main__":
    common.print_rows(main("--quick" in sys.argv))
