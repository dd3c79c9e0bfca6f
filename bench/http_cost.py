"""Item 4: HTTP cost of a worker against the fake backend, beside the reference client.

    python bench/http_cost.py [--quick]

A real worker process (`python -m perfect_runner --flows <tmp module> --server <fake>`)
serves tests/fake_perfect.py's FakePerfect on 127.0.0.1. One flow runs three tasks of
~2 s each (1 s in quick mode): one silent, one printing 20 lines/s, one printing 2,000
lines in a burst. The fake records every request; the bench counts them per task, per
running task-second (log POSTs aside) and per output line.

The reference client's pattern is modelled in this process, in the same run, against the
same fake, for the same task durations and lines: a RUNNING update every 100 ms (from a
thread) and one blocking log POST per printed line (inside print), with `requests`.

Second part: a task times a burst of 10,000 prints (perf_counter around the loop),
with the fake's logs endpoint delayed 300 ms per call vs no delay, interleaved A B A B.

This module also holds the worker/fake helpers the other backend items
(heartbeat_load, supervision_latency, scale_out) import.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import common
import requests
from common import Row, Stats, print_table

sys.path.insert(0, str(common.REPO / "tests"))
from fake_perfect import FakePerfect, Recorded  # noqa: E402

LOGS = "/api/flows/*/logs"


# --- helpers shared by the backend items -------------------------------------------


class WorkerProcess:
    """`python -m perfect_runner --flows MODULE --server URL ...` as a child process."""

    def __init__(self, module: str, url: str, directory: Path, *extra: str,
                 name: str = "worker") -> None:
        self.stderr_path = directory / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "perfect_runner", "--flows", module, "--server", url,
                   "--log-dir", str(directory / f"{name}-logs"), *extra]
        self.proc = subprocess.Popen(command, cwd=directory, stdout=subprocess.DEVNULL,
                                     stderr=self._stderr, env=common.bench_env())

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        return self.proc.returncode

    def tail(self, lines: int = 15) -> str:
        text = self.stderr_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def wait_registered(fake: FakePerfect, flow: str, timeout: float = 30.0) -> None:
    """Wait until a library entry of `flow` exists (the worker (re-)registered it)."""
    fake.wait_for(lambda: any(f["name"] == flow for f in fake.flows), timeout)


def wait_run_over(fake: FakePerfect, run_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until the run ended and the worker posted `complete` for it."""
    path = f"/api/runs/{run_id}/complete"

    def over() -> bool:
        return (fake.run(run_id)["state"] in ("COMPLETED", "FAILED")
                and any(r.path == path and r.status is not None for r in fake.requests))
    fake.wait_for(over, timeout)
    return fake.run(run_id)


def beat_gaps(beats: list[float], start: float, end: float) -> list[float]:
    """Intervals between heartbeat arrivals from the last before `start` to the first
    after `end`: the gaps the backend's watchdog saw over that time."""
    window = [t for t in beats if t <= start][-1:] + [t for t in beats if start < t <= end] \
        + [t for t in beats if t > end][:1]
    return [b - a for a, b in zip(window, window[1:], strict=False)]


def state_posts(fake: FakePerfect, run_id: str) -> list[Recorded]:
    return fake.requests_to(f"/api/runs/{run_id}/tasks/*/state", "POST")


def in_window(records: list[Recorded], start: float, end: float) -> list[Recorded]:
    return [r for r in records if start <= r.time <= end]


# --- the flows --------------------------------------------------------------------

FLOWS = '''
import time

from perfect_runner import flow, task

SECONDS = {seconds!r}
BURST_OUT = {burst_out!r}


@task(name="silent")
def silent():
    time.sleep(SECONDS)


@task(name="steady 20 lines/s")
def steady():
    start = time.monotonic()
    for i in range(int(SECONDS * 20)):
        time.sleep(max(0.0, start + i / 20 - time.monotonic()))
        print(f"steady line {{i}}", flush=True)
    time.sleep(max(0.0, start + SECONDS - time.monotonic()))


@task(name="burst 2000 lines")
def burst():
    start = time.monotonic()
    for i in range(2000):
        print(f"burst line {{i}}")
    time.sleep(max(0.0, start + SECONDS - time.monotonic()))


@flow()
def http_cost():
    silent()
    steady()
    burst()


@task(name="10000 prints")
def print_burst():
    timings = []
    for _ in range({bursts}):
        start = time.perf_counter()
        for i in range(10_000):
            print(f"print burst line {{i}}")
        timings.append(time.perf_counter() - start)
    with open(BURST_OUT, "a") as out:
        out.write(" ".join(map(str, timings)) + "\\n")


@flow()
def print_10000():
    print_burst()
'''

TASK_LINES = {0: 0, 1: 20, 2: 2000}  # per task index; lines of task 1 scale with seconds


# --- the reference client's pattern ----------------------------------------------------


class Reference:
    """The reference SDK's requests: RUNNING every 100 ms, one blocking POST per line."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()
        self.updates = requests.Session()  # the RUNNING thread's own connection
        body = {"name": "reference", "tasks": [{"name": n} for n in
                                               ("silent", "steady", "burst")]}
        flow_id = self.session.post(f"{url}/api/flows", json=body).json()["flow"]["id"]
        self.run_id = self.session.post(f"{url}/api/engine/run/{flow_id}", json={}).json()["runId"]

    def _state(self, session: requests.Session, index: int, state: str) -> None:
        session.post(f"{self.url}/api/runs/{self.run_id}/tasks/{index}/state",
                     json={"state": state, "taskName": f"task {index}", "progress": 0})

    def print(self, line: str) -> None:
        self.session.post(f"{self.url}/api/flows/{self.run_id}/logs", json={"log": line})

    def task(self, index: int, seconds: float, lines_per_s: float, burst: int) -> float:
        """One task of `seconds`; returns its running time."""
        start = time.monotonic()
        self._state(self.session, index, "RUNNING")
        done = threading.Event()

        def running() -> None:
            while not done.wait(0.1):
                self._state(self.updates, index, "RUNNING")
        thread = threading.Thread(target=running, daemon=True)
        thread.start()
        for i in range(burst):
            self.print(f"burst line {i}")
        if lines_per_s:
            for i in range(int(seconds * lines_per_s)):
                time.sleep(max(0.0, start + i / lines_per_s - time.monotonic()))
                self.print(f"steady line {i}")
        time.sleep(max(0.0, start + seconds - time.monotonic()))
        done.set()
        thread.join()
        self._state(self.session, index, "COMPLETED")
        return time.monotonic() - start

    def run(self, seconds: float) -> float:
        busy = self.task(0, seconds, 0, 0)
        busy += self.task(1, seconds, 20, 0)
        busy += self.task(2, seconds, 0, 2000)
        self.session.post(f"{self.url}/api/runs/{self.run_id}/complete", json={"taskCount": 3})
        return busy


# --- measurement ---------------------------------------------------------------------


def _worker_cost(fake: FakePerfect, seconds: float) -> dict[str, Any]:
    before = len(fake.requests)
    start = time.monotonic()
    run_id = fake.trigger("http_cost")
    wait_run_over(fake, run_id)
    end = time.monotonic()
    run = fake.run(run_id)
    window = in_window(fake.requests[before:], start, end)
    mine = [r for r in window if not r.path.startswith("/api/engine/runs")]
    states = [r for r in mine if r.path.startswith(f"/api/runs/{run_id}/tasks/")]
    logs = [r for r in mine if r.path == f"/api/flows/{run_id}/logs"]
    busy = sum((t["durationMs"] or 0) for t in run["tasks"]) / 1000
    per_task = {i: sum(1 for r in states if r.path.split("/")[5] == str(i)) for i in range(3)}
    lines = sum(len(str(r.body.get("log", "")).splitlines()) for r in logs
                if isinstance(r.body, dict))
    return {"state": run["state"], "busy": busy, "all": len(mine), "logs": len(logs),
            "states": len(states), "per_task": per_task, "lines_sent": lines,
            "heartbeats": sum(1 for r in mine if r.path == "/api/heartbeat"),
            "polls": sum(1 for r in mine if r.path == "/api/execution-requests"),
            "other": len(mine) - len(states) - len(logs)}


def _reference_cost(fake: FakePerfect, seconds: float) -> dict[str, Any]:
    ref = Reference(fake.url)
    before = len(fake.requests)
    busy = ref.run(seconds)
    recs = [r for r in fake.requests[before:] if ref.run_id in r.path]
    states = [r for r in recs if "/tasks/" in r.path]
    logs = [r for r in recs if r.path.endswith("/logs")]
    per_task = {i: sum(1 for r in states if r.path.split("/")[5] == str(i)) for i in range(3)}
    return {"state": fake.run(ref.run_id)["state"], "busy": busy, "all": len(recs),
            "logs": len(logs), "states": len(states), "per_task": per_task,
            "lines_sent": len(logs), "heartbeats": 0, "polls": 0,
            "other": len(recs) - len(states) - len(logs)}


def _print_burst(fake: FakePerfect, out: Path) -> list[float]:
    wait_registered(fake, "print_10000")
    count = len(out.read_text().splitlines()) if out.exists() else 0
    run_id = fake.trigger("print_10000")
    wait_run_over(fake, run_id)
    samples = out.read_text().splitlines()
    if len(samples) != count + 1:
        raise RuntimeError(f"print burst run {run_id} left no timing")
    return [float(x) for x in samples[-1].split()]


def main(quick: bool = False) -> list[Row]:
    seconds = 2.0
    rounds = 1 if quick else 4
    bursts = 2 if quick else 5
    directory = common.work_dir("http")
    burst_out = directory / "burst.txt"
    module = common.write_module(directory, "http_flows",
                                 FLOWS.format(seconds=seconds, burst_out=str(burst_out),
                                              bursts=bursts))
    lines = {0: 0, 1: int(seconds * 20), 2: 2000}
    with FakePerfect(poll_hold=5.0) as fake:
        worker = WorkerProcess(module, fake.url, directory)
        try:
            wait_registered(fake, "http_cost")
            wait_registered(fake, "print_10000")
            print("item 4: worker vs reference request pattern", file=sys.stderr)
            ours = _worker_cost(fake, seconds)
            # The reference pattern is information, not a verdict: full runs only.
            ref = None if quick else _reference_cost(fake, seconds)
        except Exception:
            print(worker.tail(), file=sys.stderr)
            raise
        finally:
            worker.stop()
    # A second worker, on a fresh fake, for the bursts: at most 10 log entries per run,
    # so a run with the logs endpoint at 300 ms per call drains in ~3 s (the bursts happen before
    # the first entry is even delivered, so the limit does not change what is timed).
    with FakePerfect(poll_hold=5.0) as fake:
        worker = WorkerProcess(module, fake.url, directory, "--max-log-entries", "10",
                               name="burst-worker")
        try:
            wait_registered(fake, "print_10000")
            print(f"item 4: 10,000 prints, logs delayed 300 ms vs none ({rounds} rounds)",
                  file=sys.stderr)
            _print_burst(fake, burst_out)  # warm-up

            def delayed() -> list[float]:
                fake.set_delay(LOGS, 0.3)
                try:
                    return _print_burst(fake, burst_out)
                finally:
                    fake.set_delay(LOGS, 0)

            pooled = common.interleave({"no delay": lambda: _print_burst(fake, burst_out),
                                        "logs delayed 300 ms": delayed}, rounds)
        except Exception:
            print(worker.tail(), file=sys.stderr)
            raise
        finally:
            worker.stop()

    total_lines = sum(lines.values())
    table = []
    clients = [("perfect_runner worker", ours), ("reference client pattern", ref)]
    for label, c in [(label, c) for label, c in clients if c is not None]:
        besides_logs = c["all"] - c["logs"]
        table.append([label, c["state"], f"{c['busy']:.2f}", c["all"],
                      " / ".join(str(c["per_task"][i]) for i in range(3)),
                      c["other"] - c["heartbeats"] - c["polls"],
                      c["heartbeats"], c["polls"], c["logs"],
                      besides_logs / c["busy"], c["logs"] / total_lines])
    print_table(f"4. HTTP requests for one run of 3 tasks x {seconds:.0f} s (silent, 20 lines/s, "
                f"2,000-line burst; {total_lines} lines), counted by the fake",
                ["client", "run", "task s", "requests", "state POSTs per task",
                 "other", "heartbeats", "polls", "log POSTs", "req/task-s w/o logs",
                 "log POSTs/line"], table)

    print_table(f"4. 10,000 prints inside a task, timed by the task (perf_counter; {bursts} "
                f"bursts per run, {rounds} rounds)",
                common.TIMING_HEADERS,
                common.timing_rows(pooled, "no delay"))
    plain = Stats.of(pooled["no delay"]).median
    slow = Stats.of(pooled["logs delayed 300 ms"]).median
    ratio = slow / plain
    rate = (ours["all"] - ours["logs"]) / ours["busy"]
    ref_rate = f"{(ref['all'] - ref['logs']) / ref['busy']:.1f}" if ref else "full run only"
    ref_states = f"{ref['states'] / 3:.1f}" if ref else "full run only"
    ref_logs = f"{ref['logs'] / total_lines:.2f}" if ref else "full run only"
    return [
        Row("4 http", "requests/task-s besides logs", "<= 2.5",
            f"{rate:.2f} (reference {ref_rate})", rate <= 2.5 and ours["state"] == "COMPLETED"),
        Row("4 http", "of which state POSTs per task-s", "-",
            f"{ours['states'] / ours['busy']:.2f} (+ heartbeats {ours['heartbeats']}, polls "
            f"{ours['polls']}, other {ours['other'] - ours['heartbeats'] - ours['polls']})",
            None),
        Row("4 http", "requests per task (state POSTs)", "-",
            f"{ours['states'] / 3:.1f} (reference {ref_states})", None),
        Row("4 http", "log POSTs per output line", "-",
            f"{ours['logs'] / total_lines:.3f} (reference {ref_logs})",
            None),
        Row("4 http", "10k prints: logs 300 ms / no delay", "~1 (<= 1.3)",
            f"{ratio:.2f}x ({slow * 1000:.1f} / {plain * 1000:.1f} ms)", ratio <= 1.3),
    ]


if __name__ == "__main__":
    common.print_rows(main("--quick" in sys.argv))
