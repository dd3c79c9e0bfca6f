"""Item 13.3: many runs at once in one worker (--concurrency 1, 8, 32, 64).

    python bench/many_runs.py [--quick] [--concurrency N ...] [--tasks T] [--lines L]

For each concurrency C: a fresh fake backend (tests/fake_perfect.py, its default cost
model: run writes one at a time, 20 ms per MB of the stored run) gets max(C, 4) library
entries of one flow (POST /api/flows), one worker process starts with --concurrency C,
and once it long-polls, every entry is triggered by id, one after another. Each run calls
T = 20 tasks in sequence; each task prints L = 2,000 lines. Quick mode: C = 64 only,
T = 5.

Measured while the runs go (the bench samples /proc/<worker pid> every 0.25 s):
- exactly once: every run COMPLETED at the fake with one complete POST, and every task
  call ran once (each appends "<run token> <index> <start latency>" to a file);
- the heartbeat's largest gap: POST /api/heartbeat arrivals from the last before the
  first trigger to the first after the last complete;
- the control process's CPU per task call: utime + stime of the worker process (all its
  threads, not its children) over the same window / task calls;
- its thread count (the most seen) and the worker's whole process tree (the most seen;
  above CAP_PROCS the bench kills the worker: nothing runs away);
- task start: the flow body passes time.monotonic() to each task, whose first statement
  subtracts it from its own (CLOCK_MONOTONIC is one clock for every process); p50/p99.
Writes docs/many_runs.svg (the curve) when more than one concurrency was measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import common
import psutil
import requests
from common import Row, percentile, print_table
from http_cost import FakePerfect, WorkerProcess, beat_gaps, wait_registered
from many_runs_svg import write_curve

TASKS = 20
QUICK_TASKS = 5  # quick mode: 64 runs of 5 tasks (~8 s instead of ~25 s)
LINES = 2000
CONCURRENCIES = (1, 8, 32, 64)
SVG = common.REPO / "docs" / "many_runs.svg"
TICK = os.sysconf("SC_CLK_TCK")

FLOWS = '''
import time
import uuid

from perfect_runner import flow, task

EXECUTIONS = {executions!r}
TASKS = {tasks!r}
LINES = {lines!r}


@task(name="print lines")
def print_lines(token, index, called_at):
    started = time.monotonic() - called_at
    with open(EXECUTIONS, "a") as out:
        out.write(f"{{token}} {{index}} {{started:.6f}}\\n")
    for i in range(LINES):
        print(f"task {{index}} line {{i}} of a short task")


@flow(name="many")
def many():
    token = uuid.uuid4().hex
    for index in range(TASKS):
        print_lines(token, index, time.monotonic())
'''


@dataclass
class Sampler:
    """Samples the worker's CPU, threads and process tree from a thread, every 50 ms."""

    pid: int
    cap_procs: int
    threads: int = 0
    procs: int = 0
    fds: int = 0
    runaway: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Sampler:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def cpu_seconds(self) -> float:
        """utime + stime of the worker process itself (every thread, no children)."""
        with open(f"/proc/{self.pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def _run(self) -> None:
        worker = psutil.Process(self.pid)
        # Every 0.25 s: listing the tree reads all of /proc, CPU the worker would miss.
        while not self._stop.wait(0.25):
            try:
                self.threads = max(self.threads, worker.num_threads())
                tree = worker.children(recursive=True)
                self.fds = max(self.fds, worker.num_fds())
            except psutil.Error:
                return
            self.procs = max(self.procs, len(tree))
            if len(tree) > self.cap_procs:
                self.runaway = f"{len(tree)} processes in the worker's tree"
                for proc in [worker, *tree]:  # pdeathsig would do it; do not wait
                    try:
                        proc.kill()
                    except psutil.Error:
                        pass
                return


@dataclass
class Result:
    concurrency: int
    runs: int
    calls: int
    seconds: float
    completed: int
    once: bool
    executions: int
    beat_max: float
    beats: int
    cpu_per_call_ms: float
    threads: int
    procs: int
    fds: int
    start_p50_ms: float
    start_p99_ms: float
    alive: bool
    runaway: str

    @property
    def ok(self) -> bool:
        return (self.once and self.completed == self.runs and self.executions == self.calls
                and self.alive and not self.runaway)


def _library_entries(url: str, count: int, tasks: int) -> list[str]:
    body = {"name": "many", "description": "", "tags": {},
            "tasks": [{"name": "print lines", "description": "", "estimatedTime": 1000,
                       "crucialPass": True}] * tasks,
            "autoTrigger": False, "autoTriggerConfig": "development"}
    with requests.Session() as http:
        return [http.post(f"{url}/api/flows", json=body).json()["flow"]["id"]
                for _ in range(count)]


def measure(concurrency: int, tasks: int, lines: int) -> Result:
    runs_wanted = max(concurrency, 4)
    directory = common.work_dir(f"many-{concurrency}")
    executions = directory / "executions.txt"
    module = common.write_module(directory, "many_flows", FLOWS.format(
        executions=str(executions), tasks=tasks, lines=lines))
    with FakePerfect(poll_hold=2.0) as fake:
        ids = _library_entries(fake.url, runs_wanted, tasks)
        worker = WorkerProcess(module, fake.url, directory, "--concurrency", str(concurrency),
                               name=f"worker-c{concurrency}")
        sampler = Sampler(worker.proc.pid, cap_procs=4 * concurrency + 16)
        try:
            wait_registered(fake, "many")
            fake.wait_for(lambda: fake.waiting_pollers >= 1, timeout=30)
            sampler.start()
            print(f"item 13.3: {runs_wanted} runs x {tasks} tasks x {lines} lines, "
                  f"--concurrency {concurrency}", file=sys.stderr, flush=True)
            cpu_before = sampler.cpu_seconds()
            start = time.monotonic()
            with requests.Session() as http:
                run_ids = {http.post(f"{fake.url}/api/engine/trigger/{i}", json={}).json()
                           ["runId"] for i in ids}
            end = _wait_all_over(fake, run_ids, sampler, 60 + runs_wanted * tasks * 0.25)
            cpu = sampler.cpu_seconds() - cpu_before
            fake.wait_for(lambda: any(r.time > end for r in fake.requests_to("/api/heartbeat")),
                          timeout=5.0)
            time.sleep(0.5)  # anything executed twice would show up meanwhile
            alive = worker.proc.poll() is None
        except Exception:
            print(worker.tail(), file=sys.stderr)
            raise
        finally:
            sampler.stop()
            worker.stop()
        beats = [r.time for r in fake.requests_to("/api/heartbeat", "POST")]
        completes = Counter(r.path.split("/")[3] for r in
                            fake.requests_to("/api/runs/*/complete", "POST"))
        completed = sum(fake.run(r)["state"] == "COMPLETED" for r in run_ids)
    gaps = beat_gaps(beats, start, end)
    calls = runs_wanted * tasks
    done = [line.split() for line in executions.read_text().splitlines()] \
        if executions.exists() else []
    per_call = Counter((token, index) for token, index, _ in done)
    starts = [float(s) for *_, s in done]
    once = (all(completes[r] == 1 for r in run_ids) and len(per_call) == calls
            and all(n == 1 for n in per_call.values()))
    return Result(concurrency, runs_wanted, calls, end - start, completed, once, len(done),
                  max(gaps, default=float("nan")), len(gaps) + 1, cpu / calls * 1000,
                  sampler.threads, sampler.procs, sampler.fds,
                  statistics.median(starts) * 1000 if starts else float("nan"),
                  percentile(starts, 99) * 1000 if starts else float("nan"),
                  alive, sampler.runaway)


def _wait_all_over(fake: FakePerfect, run_ids: set[str], sampler: Sampler,
                   timeout: float) -> float:
    """Wait until every run's complete was answered; when the last one arrived.

    Looked at every 0.1 s from here, not with `fake.wait_for`: its predicate runs on
    every request under the fake's lock, and one over 64 runs' requests (or a deep
    copy of their logs) slows the backend it measures.
    """
    deadline = time.monotonic() + timeout
    while not sampler.runaway:
        answered = {r.path.split("/")[3]: r.time for r in
                    fake.requests_to("/api/runs/*/complete", "POST") if r.status is not None}
        if run_ids <= answered.keys():
            return max(answered[r] for r in run_ids)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(run_ids - answered.keys())} of {len(run_ids)} runs "
                               f"not over within {timeout:.0f} s")
        time.sleep(0.1)
    return time.monotonic()


def report(results: list[Result], tasks: int, lines: int) -> list[Row]:
    print_table(f"13.3 Many runs at once: one worker, max(C, 4) runs of {tasks} tasks x "
                f"{lines} lines, fake backend (run writes one at a time, 20 ms/MB)",
                ["--concurrency", "runs", "task calls", "trigger -> last complete s",
                 "calls/s", "exactly once", "heartbeat max gap s", "control CPU ms/call",
                 "threads", "processes", "fds", "start p50 ms", "start p99 ms"],
                [[r.concurrency, r.runs, r.calls, r.seconds, r.calls / r.seconds,
                  "yes" if r.ok else "NO", r.beat_max, r.cpu_per_call_ms, r.threads, r.procs,
                  r.fds, r.start_p50_ms, r.start_p99_ms] for r in results])
    rows = []
    for r in results:
        item = f"13.3 c={r.concurrency}, {r.runs}x{r.calls // r.runs} calls"
        rows += [
            Row(item, "every run completes exactly once",
                "yes", f"{'yes' if r.ok else 'NO'} ({r.completed}/{r.runs} runs, "
                f"{r.executions}/{r.calls} calls){' ' + r.runaway if r.runaway else ''}", r.ok),
            Row(item, "heartbeat largest gap", "<= 3.5 s",
                f"{r.beat_max:.2f} s ({r.beats} beats)", r.beat_max <= 3.5),
            Row(item, "control CPU per task call / threads", "-",
                f"{r.cpu_per_call_ms:.2f} ms / {r.threads} threads", None),
            Row(item, "task start p50 / p99", "-",
                f"{r.start_p50_ms:.1f} / {r.start_p99_ms:.1f} ms", None),
        ]
    return rows


def main(quick: bool = False, concurrencies: tuple[int, ...] | None = None,
         tasks: int | None = None, lines: int = LINES) -> list[Row]:
    chosen = concurrencies or ((64,) if quick else CONCURRENCIES)
    tasks = tasks or (QUICK_TASKS if quick else TASKS)
    results = [measure(c, tasks, lines) for c in chosen]
    if len(results) > 1:
        write_curve(SVG, [(r.concurrency, r.start_p50_ms, r.start_p99_ms, r.cpu_per_call_ms,
                           r.threads, r.beat_max, r.calls / r.seconds) for r in results],
                    f"{tasks} tasks x {lines} lines per run")
        print(f"curve written to {SVG.relative_to(common.REPO)}", file=sys.stderr)
    return report(results, tasks, lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--concurrency", type=int, nargs="+")
    parser.add_argument("--tasks", type=int)
    parser.add_argument("--lines", type=int, default=LINES)
    args = parser.parse_args()
    common.print_rows(main(args.quick, tuple(args.concurrency or ()) or None,
                           args.tasks, args.lines))
