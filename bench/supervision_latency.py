"""Item 6: supervision latency.

    python bench/supervision_latency.py [--quick]

(a) Timeout -> whole tree dead. In-process `FlowExecutor` (one per --kill-grace value,
    0 and 0.5, interleaved A B A B). A task with timeout=1 ignores SIGTERM (and swallows
    the in-task timeout exception, so only the SIGKILL after the grace ends it), starts 3
    `sleep` subprocesses and writes down its pid and theirs (numbers of the sandbox's PID
    namespace, which the bench maps to ours through /proc/*/status). The deadline is the
    listener's task_started time (control process, time.monotonic) + 1 s; a thread
    polls psutil in a tight loop from just before the deadline until every pid is gone
    (a zombie counts as gone). Target <= 50 ms + the grace.
(b) Memory-limit overshoot. A task with memory_limit="200MB" allocates 10 MB chunks
    (b"x" * 10 MiB touches every page) paced at ~1 GB/s, capped at 1.5 GB, under
    RLIMIT_AS 2 GiB. Peak RSS from the failure note minus the limit. Target <= 150 MB.
(c) Crash -> FAILED at the backend. A worker process + the fake; the task writes
    time.monotonic() (CLOCK_MONOTONIC: one clock for every process) to a file, then
    segfaults. Latency from that timestamp to the fake receiving the FAILED update.
    Target <= 100 ms.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from pathlib import Path

import common
import psutil
from common import Row, Stats, print_table
from http_cost import FakePerfect, WorkerProcess, state_posts, wait_registered, wait_run_over

from perfect_runner.executor.engine import FlowExecutor
from perfect_runner.executor.events import NullListener
from perfect_runner.executor.options import RunOptions
from perfect_runner.executor.records import RunRecord, TaskRecord

TIMEOUT = 1.0
LIMIT_MB = 200

FLOWS = '''
import ctypes
import os
import resource
import signal
import subprocess
import time

from perfect_runner import flow, task

TMP = {tmp!r}


@task(timeout={timeout!r})
def stubborn():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    children = [subprocess.Popen(["sleep", "1000"]) for _ in range(3)]
    with open(os.path.join(TMP, "tree.pids"), "w") as out:
        # In the sandbox these pids are its PID namespace's: the bench maps them.
        out.write(os.readlink("/proc/self/ns/pid") + "\\n")
        out.write(" ".join(str(p) for p in [os.getpid()] + [c.pid for c in children]))
    while True:  # also swallows the in-task timeout exception: only SIGKILL ends it
        try:
            while True:
                time.sleep(1)
        except BaseException:
            pass


@flow()
def timeout_tree():
    stubborn()


@task(memory_limit="{limit}MB")
def allocate():
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    chunks = []
    start = time.monotonic()
    while len(chunks) < 150:  # capped at 1.5 GB
        chunks.append(b"x" * (10 * 1024 * 1024))
        time.sleep(max(0.0, start + len(chunks) * 0.01 - time.monotonic()))
    time.sleep(10)


@flow()
def memory_bomb():
    allocate()


@task(name="segfault")
def crash():
    with open(os.path.join(TMP, "crash.time"), "w") as out:
        out.write(repr(time.monotonic()))
    ctypes.string_at(0)


@flow()
def crash_flow():
    crash()
'''


def host_pids(namespace: str, pids: list[int]) -> list[int]:
    """Our pids of the processes numbered `pids` in PID namespace `namespace`."""
    if os.readlink("/proc/self/ns/pid") == namespace:
        return pids
    found = {}
    for entry in os.listdir("/proc"):
        try:
            if not entry.isdigit() or os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                continue
            with open(f"/proc/{entry}/status") as status:
                line = next(x for x in status if x.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        found[int(line.split()[-1])] = int(entry)
    missing = [pid for pid in pids if pid not in found]
    if missing:
        raise RuntimeError(f"pids {missing} of namespace {namespace} not found")
    return [found[pid] for pid in pids]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class TreeWatch(NullListener):
    """Records task_started; a thread then waits for the pid file and for every pid to go."""

    def __init__(self, pid_file: Path) -> None:
        self.pid_file = pid_file
        self.started: float | None = None
        self.dead: float | None = None
        self.note = ""
        self._thread: threading.Thread | None = None

    def task_started(self, run: RunRecord, task: TaskRecord) -> None:
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def task_finished(self, run: RunRecord, task: TaskRecord) -> None:
        self.note = task.note or ""

    def _watch(self) -> None:
        end = time.monotonic() + 10
        while not self.pid_file.exists() or len(self.pid_file.read_text().splitlines()) < 2:
            time.sleep(0.001)
        namespace, listed = self.pid_file.read_text().splitlines()
        pids = host_pids(namespace, [int(p) for p in listed.split()])
        assert self.started is not None
        time.sleep(max(0.0, self.started + TIMEOUT - 0.05 - time.monotonic()))
        while time.monotonic() < end:  # tight loop from 50 ms before the deadline
            if all(_gone(p) for p in pids):
                self.dead = time.monotonic()
                return
        return

    def latency(self) -> float:
        if self._thread is not None:
            self._thread.join(15)
        if self.started is None or self.dead is None:
            return float("nan")
        return self.dead - (self.started + TIMEOUT)


def _timeout_batch(executor: FlowExecutor, directory: Path) -> list[float]:
    pid_file = directory / "tree.pids"
    pid_file.unlink(missing_ok=True)
    watch = TreeWatch(pid_file)
    record = executor.new_run("timeout_tree", watch).execute()
    if record.state != "FAILED" or "timed out" not in watch.note:
        raise RuntimeError(f"timeout run ended {record.state}: {watch.note}")
    return [watch.latency()]


def _memory_run(executor: FlowExecutor) -> tuple[float, str]:
    notes: list[str] = []

    class Notes(NullListener):
        def task_finished(self, run: RunRecord, task: TaskRecord) -> None:
            notes.append(task.note or "")

    executor.new_run("memory_bomb", Notes()).execute()
    note = notes[0] if notes else ""
    match = re.search(r"\(RSS ([\d.]+) (B|KiB|MiB|GiB|kB|MB|GB)\)", note)
    if "memory limit" not in note or not match:
        raise RuntimeError(f"memory bomb not stopped by the limit: {note!r}")
    # The note shows the RSS in the kind of unit the limit was written in.
    scale = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
             "kB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)]
    peak = float(match.group(1)) * scale
    return (peak - LIMIT_MB * 1_000_000) / 1e6, note


def _crash_latency(fake: FakePerfect, directory: Path) -> float:
    stamp = directory / "crash.time"
    stamp.unlink(missing_ok=True)
    wait_registered(fake, "crash_flow")
    run_id = fake.trigger("crash_flow")
    wait_run_over(fake, run_id)
    failed = [r for r in state_posts(fake, run_id)
              if isinstance(r.body, dict) and r.body.get("state") == "FAILED"]
    if len(failed) != 1:
        raise RuntimeError(f"run {run_id}: {len(failed)} FAILED updates")
    return failed[0].time - float(stamp.read_text())


def main(quick: bool = False) -> list[Row]:
    rounds = 2 if quick else 4
    mem_runs = 2 if quick else 4
    crash_runs = 3 if quick else 8
    directory = common.work_dir("supervision")
    module = common.write_module(directory, "supervision_flows", FLOWS.format(
        tmp=str(directory), timeout=TIMEOUT, limit=LIMIT_MB))

    executors = {grace: FlowExecutor([module], options=RunOptions(kill_grace=grace))
                 for grace in (0.0, 0.5)}
    try:
        print(f"item 6a: timeout -> dead tree ({rounds} rounds)", file=sys.stderr)
        pooled = common.interleave(
            {f"--kill-grace {g}": (lambda e=e: _timeout_batch(e, directory))
             for g, e in executors.items()}, rounds)
        print(f"item 6b: memory overshoot ({mem_runs} runs)", file=sys.stderr)
        overshoots, notes = [], []
        for _ in range(mem_runs):
            over, note = _memory_run(executors[0.0])
            overshoots.append(over)
            notes.append(note)
    finally:
        for e in executors.values():
            e.close()

    print(f"item 6c: segfault -> FAILED at the backend ({crash_runs} runs)", file=sys.stderr)
    with FakePerfect(poll_hold=5.0) as fake:
        worker = WorkerProcess(module, fake.url, directory)
        try:
            crashes = [_crash_latency(fake, directory) for _ in range(crash_runs)]
        except Exception:
            print(worker.tail(), file=sys.stderr)
            raise
        finally:
            worker.stop()

    table = []
    for name, samples in pooled.items():
        s = Stats.of(samples)
        table.append([f"(a) timeout=1, {name}: deadline -> tree dead", s.n, s.median * 1000,
                      s.p95 * 1000, s.min * 1000, s.max * 1000])
    m = Stats.of(overshoots)
    table.append([f"(b) peak RSS - {LIMIT_MB} MB limit (MB), 10 MB chunks at ~1 GB/s",
                  m.n, m.median, m.p95, m.min, m.max])
    c = Stats.of(crashes)
    table.append(["(c) segfault -> fake receives FAILED", c.n, c.median * 1000, c.p95 * 1000,
                  c.min * 1000, c.max * 1000])
    print_table("6. Supervision latency (ms; (b) in MB)",
                ["what", "n", "median", "p95", "min", "max"], table)
    print(f"example memory note: {notes[0]}\n")

    rows: list[Row] = []
    for grace in executors:
        s = Stats.of(pooled[f"--kill-grace {grace}"])
        target = 0.050 + grace
        rows.append(Row("6a supervision", f"timeout -> tree dead, grace {grace} (max)",
                        f"<= {target * 1000:.0f} ms",
                        f"med {s.median * 1000:.0f} / max {s.max * 1000:.0f} ms",
                        s.max <= target))
    rows.append(Row("6b supervision", f"memory overshoot over {LIMIT_MB} MB (max)", "<= 150 MB",
                    f"med {m.median:.0f} / max {m.max:.0f} MB", m.max <= 150))
    rows.append(Row("6c supervision", "segfault -> FAILED at backend (max)", "<= 100 ms",
                    f"med {c.median * 1000:.0f} / max {c.max * 1000:.0f} ms", c.max <= 0.100))
    return rows




if __name__ == "__main__":
    common.print_rows(main("--quick" in sys.argv))
