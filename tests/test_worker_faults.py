"""The worker under backend faults and load: the real worker process against FakePerfect.

Every test starts `python -m perfect_runner` as a subprocess (its stderr goes to a
file, so a chatty worker can never block on a full pipe) and asserts what a user
would see: on the fake backend (runs, task states, log entries, request timings)
and in the worker's own log output. Synchronisation is on files the tasks write
and on requests the fake records, never on sleeps.
"""

from __future__ import annotations

import re
import socket
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from conftest import host_pid
from fake_perfect import FakePerfect, Recorded
from worker_process import start_worker, stop_worker, worker_output

FLOWS = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from perfect_runner import task, flow, TaskResult

    MARK = Path(os.environ["MARKER_DIR"])


    def wait_file(name, limit=40.0):
        end = time.monotonic() + limit
        while not (MARK / name).exists():
            if time.monotonic() > end:
                raise TimeoutError(name)
            time.sleep(0.01)


    @task(estimated_time=200)
    def first():
        print("hello from first")
        return TaskResult(passed=True, note="first ok")


    @flow(name="Quick Flow")
    def quick():
        first()


    @task(estimated_time=5000)
    def flood():
        write = sys.stdout.write
        for i in range(200_000):
            write(f"flood line {i:06d} " + "x" * 40 + "\\n")
        return TaskResult(passed=True, note="flooded")


    @flow(name="Flood Flow")
    def flood_flow():
        flood()


    @task(estimated_time=2000)
    def ticker():
        (MARK / "ticker-started").write_text("")
        for i in range(40):
            print(f"tick {i:02d}", flush=True)
            time.sleep(0.05)
        (MARK / "ticker-done").write_text("")
        return TaskResult(passed=True, note="ticked")


    @flow(name="Ticker Flow")
    def ticker_flow():
        ticker()
        first()


    @task(estimated_time=100000)
    def hold():
        print("holding", flush=True)
        (MARK / f"hold-started-{os.getpid()}").write_text("")
        wait_file("release")
        print("released", flush=True)
        return TaskResult(passed=True, note="held")


    @flow(name="Hold Flow")
    def hold_flow():
        hold()
        first()
        first()


    @task(estimated_time=4000)
    def chatter():
        end = time.monotonic() + 4.0
        i = 0
        while time.monotonic() < end:
            for _ in range(50):
                print(f"chatter {i}")
                i += 1
            sys.stdout.flush()
            time.sleep(0.005)
        return TaskResult(passed=True, note=f"{i} lines")


    @flow(name="Chatter Flow")
    def chatter_flow():
        chatter()
''')

N_FLOWS = 5
STATE_PATH = re.compile(r"/api/runs/[^/]+/tasks/(\d+)/state")


@pytest.fixture
def flows_module(tmp_path: Path) -> Path:
    path = tmp_path / "fault_flows.py"
    path.write_text(FLOWS)
    return path


def finished(fake: FakePerfect, run_id: str) -> bool:
    return fake.run(run_id)["state"] in ("COMPLETED", "FAILED")


def registered(fake: FakePerfect, timeout: float = 20) -> None:
    fake.wait_for(lambda: len(fake.flows) >= N_FLOWS, timeout)


def run_requests(fake: FakePerfect, run_id: str) -> list[Recorded]:
    return [r for r in fake.requests if f"/{run_id}/" in r.path]


def states_sent(fake: FakePerfect, run_id: str, status: int | None = 200) -> list[tuple]:
    """(taskIndex, state) of the run's state updates the fake answered with `status`."""
    out = []
    for r in run_requests(fake, run_id):
        match = STATE_PATH.fullmatch(r.path)
        if match and (status is None or r.status == status):
            out.append((int(match.group(1)), r.body.get("state")))
    return out


def final_states(states: list[tuple]) -> list[tuple]:
    """The state sequence without repeated (periodic) RUNNING updates."""
    out: list[tuple] = []
    for item in states:
        if not out or out[-1] != item:
            out.append(item)
    return out


def hold_started(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("hold-started-*"))


def add_library_entry(fake: FakePerfect, name: str) -> None:
    """Another library entry of a flow (as a second registration would make)."""
    entry = next(f for f in fake.flows if f["name"] == name)
    answer = requests.post(f"{fake.url}/api/flows", timeout=5, json={
        "name": name, "tasks": [{"name": t["name"], "estimatedTime": t["estimatedTime"]}
                                for t in entry["tasks"]]})
    assert answer.ok


def resume_after_outage(fake: FakePerfect) -> None:
    """Serve again on the same port as after a network outage.

    `fake.start()` after `fake.stop()` is a server *restart* (like the real
    server, it fails every run left RUNNING and forgets the queue). An outage
    where the backend process lives on (a proxy or network down) keeps its
    memory: that is what the worker must ride out with the run intact.
    """
    fake._started_once = False  # no restart effects: the process never died
    fake.start()


# -- 1. output flood ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_output_flood_bounded_memory_capped_entries_full_local_log(fake, flows_module,
                                                                   tmp_path):
    worker = start_worker(fake.url, flows_module, tmp_path, "--max-log-entries", "50")
    try:
        registered(fake)
        proc = psutil.Process(worker.pid)
        baseline = proc.memory_info().rss
        peak = baseline
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                try:
                    peak = max(peak, proc.memory_info().rss)
                except psutil.Error:
                    return
                done.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            run_id = fake.trigger("Flood Flow")
            fake.wait_for(lambda: finished(fake, run_id), 45)
        finally:
            done.set()
            sampler.join(5)

        assert fake.run(run_id)["state"] == "COMPLETED"
        growth = (peak - baseline) / 2**20
        assert growth < 60, f"worker RSS grew by {growth:.1f} MB during the flood"

        logs = fake.logs(run_id)
        assert len(logs) <= 50
        numbers = [int(n) for entry in logs for n in re.findall(r"flood line (\d+)", entry)]
        assert numbers, logs[:3]
        in_order = all(a < b for a, b in zip(numbers, numbers[1:], strict=False))
        assert in_order, "log entries out of order"
        log_path = tmp_path / "logs" / f"{run_id}.log"
        # Lines past the entry limit ("kept only locally") or left when the run ended
        # ("not sent to the backend") are announced by one entry each, where they are.
        notices = [e for e in logs if re.match(r"\d+ (more )?log lines were", e)]
        assert 1 <= len(notices) <= 2, [e[:200] for e in logs if "flood line" not in e]
        assert all(str(log_path) in n for n in notices), notices
        kept = sum(int(re.match(r"(\d+)", n).group(1)) for n in notices)
        # What was neither delivered nor announced as kept locally was announced as dropped.
        dropped = sum(int(m) for e in logs
                      for m in re.findall(r"(\d+) log lines not delivered", e))
        assert len(numbers) + kept + dropped >= 200_000

        # The local log file holds every line, in order.
        def local_lines() -> list[int]:
            text = log_path.read_text(errors="replace")
            return [int(n) for n in re.findall(r" OUT flood line (\d+)", text)]

        fake.wait_for(lambda: len(local_lines()) == 200_000, 10)
        assert local_lines() == list(range(200_000))
    finally:
        stop_worker(worker)


# -- 2. outage longer than a task ----------------------------------------------


@pytest.mark.timeout(60)
def test_backend_down_longer_than_a_task_everything_delivered_after(flows_module, tmp_path):
    # Generous watchdog: with the only run slot busy the worker does not poll, so only
    # its 3 s heartbeat keeps the run alive around an outage of ~2 s.
    with FakePerfect(poll_hold=2.0, watchdog_timeout=20.0) as fake:
        worker = start_worker(fake.url, flows_module, tmp_path)
        try:
            registered(fake)
            run_id = fake.trigger("Ticker Flow")
            fake.wait_for(lambda: (tmp_path / "ticker-started").exists(), 20)
            fake.stop()
            fake.wait_for(lambda: (tmp_path / "ticker-done").exists(), 20)
            back_at = time.monotonic()
            resume_after_outage(fake)

            fake.wait_for(lambda: finished(fake, run_id), 30)
            run = fake.run(run_id)
            assert run["state"] == "COMPLETED"
            assert [(t["taskName"], t["state"]) for t in run["tasks"]] == [
                ("ticker", "COMPLETED"), ("first", "COMPLETED")]
            assert run["tasks"][0]["result"]["note"] == "ticked"
            assert final_states(states_sent(fake, run_id)) == [
                (0, "RUNNING"), (0, "COMPLETED"), (1, "RUNNING"), (1, "COMPLETED")]
            ticks = [int(n) for e in fake.logs(run_id)
                     for n in re.findall(r"\[Task Output\] ticker: tick (\d+)", e)]
            # In order and complete (a request cut by the outage may arrive twice).
            assert all(a <= b for a, b in zip(ticks, ticks[1:], strict=False)), ticks
            assert sorted(set(ticks)) == list(range(40))
            assert any("hello from first" in e for e in fake.logs(run_id))
            completes = [r for r in run_requests(fake, run_id) if r.path.endswith("/complete")]
            assert completes[-1].body == {"taskCount": 2}
            fake.wait_for(lambda: [r for r in fake.requests_to("/api/heartbeat", "POST")
                                   if r.time > back_at], 10)
            assert fake.watchdog_failures == 0
        finally:
            stop_worker(worker)


# -- 3. restart during a run ---------------------------------------------------


@pytest.mark.timeout(60)
def test_backend_restart_mid_run_404_kills_run_and_worker_serves_on(fake, flows_module,
                                                                    tmp_path):
    worker = start_worker(fake.url, flows_module, tmp_path)
    try:
        registered(fake)
        run_id = fake.trigger("Hold Flow")
        marker = fake.wait_for(lambda: hold_started(tmp_path), 20)
        task_pid = host_pid(int(marker[0].name.rsplit("-", 1)[1]), under=worker.pid)
        fake.wait_for(lambda: (0, "RUNNING") in states_sent(fake, run_id), 10)
        fake.restart()  # the run left RUNNING is failed, as the real server does

        assert fake.run(run_id)["state"] == "FAILED"
        first_404 = fake.wait_for(lambda: next(
            (r for r in run_requests(fake, run_id) if r.status == 404), None), 10)
        gone, alive = psutil.wait_procs([psutil.Process(task_pid)], timeout=10) \
            if psutil.pid_exists(task_pid) else ([], [])
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]

        # The worker says so in its own log.
        fake.wait_for(lambda: [line for line in worker_output(tmp_path).splitlines()
                               if run_id in line and "404" in line], 10)

        # It keeps serving: a new trigger completes.
        ok_id = fake.trigger("Quick Flow")
        fake.wait_for(lambda: finished(fake, ok_id), 20)
        assert fake.run(ok_id)["state"] == "COMPLETED"
        # Nothing more was sent for the forgotten run after its 404.
        later = [r for r in run_requests(fake, run_id) if r.time > first_404.time]
        assert later == [], [(r.method, r.path, r.body) for r in later]
        assert fake.run(run_id)["state"] == "FAILED"
    finally:
        stop_worker(worker)


# -- 4. backend down at start --------------------------------------------------


class DeadBackend:
    """Holds the port while the backend is down: accepts and drops every connection
    (what a client sees of a crashed backend behind a proxy), counting requests by path."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.paths: list[str] = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(2)
                try:
                    head = conn.recv(4096).decode("latin-1")
                except OSError:
                    head = ""
            parts = head.split(" ")
            with self.cond:
                self.paths.append(parts[1] if len(parts) > 1 else "?")
                self.cond.notify_all()

    def wait_for(self, path: str, count: int, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.paths.count(path) >= count, timeout):
                raise TimeoutError(f"{path} tried {self.paths.count(path)} times")

    def close(self) -> None:
        self.closed = True
        self.thread.join(2)
        self.sock.close()


@pytest.mark.timeout(60)
def test_backend_down_at_start_warns_once_then_registers_and_serves(flows_module, tmp_path):
    fake = FakePerfect(poll_hold=2.0).start()
    fake.stop()  # the port is allocated; nothing serves it
    dead = DeadBackend(fake.port)
    worker = start_worker(fake.url, flows_module, tmp_path)
    try:
        # Several registration attempts fail before the backend comes back.
        dead.wait_for("/api/flows", 4, 20)
        dead.close()
        assert fake.flows == []
        fake.start()
        registered(fake)
        run_id = fake.trigger("Quick Flow")
        fake.wait_for(lambda: finished(fake, run_id), 20)
        assert fake.run(run_id)["state"] == "COMPLETED"

        lines = worker_output(tmp_path).splitlines()
        unreachable = [line for line in lines if "not reachable" in line]
        assert len(unreachable) == 1, unreachable
        assert "WARNING" in unreachable[0] and fake.url in unreachable[0]
        # The heartbeat thread says it at most once too, however many beats failed.
        assert len([line for line in lines if "not answering heartbeats" in line]) <= 1
        assert any("registered 5 flow(s)" in line for line in lines)
    finally:
        stop_worker(worker)
        dead.close()
        fake.close()


# -- 5. 5xx retried, 4xx logged once -------------------------------------------


@pytest.mark.timeout(60)
def test_5xx_answers_are_retried_and_the_run_completes(fake, flows_module, tmp_path):
    # No periodic RUNNING updates: the injected 500s hit the task's final states.
    worker = start_worker(fake.url, flows_module, tmp_path, "--progress-interval", "30")
    try:
        registered(fake)
        run_id = fake.trigger("Hold Flow")
        fake.wait_for(lambda: hold_started(tmp_path), 20)
        fake.wait_for(lambda: (0, "RUNNING") in states_sent(fake, run_id), 10)
        fake.fail_with("/api/runs/", 500, count=3)
        (tmp_path / "release").write_text("")

        fake.wait_for(lambda: finished(fake, run_id), 30)
        run = fake.run(run_id)
        assert run["state"] == "COMPLETED"
        assert [t["state"] for t in run["tasks"]] == ["COMPLETED"] * 3
        failed = [r for r in run_requests(fake, run_id) if r.status == 500]
        assert len(failed) == 3
        assert final_states(states_sent(fake, run_id)) == [
            (0, "RUNNING"), (0, "COMPLETED"), (1, "RUNNING"), (1, "COMPLETED"),
            (2, "RUNNING"), (2, "COMPLETED")]
        completes = [r for r in run_requests(fake, run_id)
                     if r.path.endswith("/complete") and r.status == 200]
        assert [r.body for r in completes] == [{"taskCount": 3}]
    finally:
        stop_worker(worker)


@pytest.mark.timeout(60)
def test_4xx_on_logs_is_logged_once_with_body_and_not_retried(fake, flows_module, tmp_path):
    worker = start_worker(fake.url, flows_module, tmp_path, "--progress-interval", "30")
    try:
        registered(fake)
        run_id = fake.trigger("Hold Flow")
        fake.wait_for(lambda: hold_started(tmp_path), 20)
        fake.wait_for(lambda: "[Task Output] hold: holding" in fake.logs(run_id), 10)
        logs_path = f"/api/flows/{run_id}/logs"
        fake.respond_with(logs_path, 400, {"success": False, "error": "entry rejected by test"},
                          count=2, method="POST")
        (tmp_path / "release").write_text("")

        fake.wait_for(lambda: finished(fake, run_id), 30)
        assert fake.run(run_id)["state"] == "COMPLETED"
        posts = fake.requests_to(logs_path, "POST")
        refused = [r for r in posts if r.status == 400]
        assert len(refused) == 2
        # Not retried: every printed line went out exactly once, delivered or refused.
        printed = ["hold: holding", "hold: released", "first: hello from first",
                   "first: hello from first"]
        seen = [line[len("[Task Output] "):] for r in posts if r.status in (200, 400)
                for line in r.body["log"].split("\n") if line.startswith("[Task Output] ")]
        assert seen == printed
        said = [line for line in worker_output(tmp_path).splitlines()
                if "refused a log entry" in line]
        assert len(said) == 1, said
        assert "HTTP 400" in said[0] and "entry rejected by test" in said[0]
    finally:
        stop_worker(worker)


# -- 6. malformed execution requests --------------------------------------------


@pytest.mark.timeout(60)
def test_malformed_execution_requests_are_logged_and_skipped(fake, flows_module, tmp_path):
    worker = start_worker(fake.url, flows_module, tmp_path)
    try:
        registered(fake)
        bad = [
            b"this is not JSON{",
            ["run-list", "Quick Flow"],
            {"flow_name": "Quick Flow", "configuration": "development"},
            {"run_id": 12345, "flow_name": "Quick Flow"},
            {"run_id": "run-types", "flow_name": "Quick Flow", "configuration": 7},
            {"run_id": "run-huge", "flow_name": "F" * 100_000},
        ]
        for body in bad:
            fake.queue_raw(body)
        fake.wait_for(lambda: fake.queued == 0, 20)
        run_id = fake.trigger("Quick Flow")
        fake.wait_for(lambda: finished(fake, run_id), 20)
        assert fake.run(run_id)["state"] == "COMPLETED"
        assert worker.poll() is None

        lines = worker_output(tmp_path).splitlines()
        skipped = [line for line in lines if "malformed execution request" in line]
        assert len(skipped) == 4, skipped
        assert any("'run_id' is missing" in line for line in skipped), skipped
        # With a valid run id the run is reported FAILED (here the fake does not know
        # these runs: it answers 404 and the worker stops reporting them).
        refused = [line for line in lines if "refusing the execution request" in line]
        assert len(refused) == 2 and "'configuration' is not a string" in refused[0], refused
        assert max(len(line) for line in lines) < 2000  # the 100 kB name is not echoed
    finally:
        stop_worker(worker)


# -- 7. heartbeat under load ---------------------------------------------------


@pytest.mark.timeout(60)
def test_heartbeat_stays_regular_while_logs_are_slow(fake, flows_module, tmp_path):
    worker = start_worker(fake.url, flows_module, tmp_path, "--max-log-entries", "25")
    try:
        registered(fake)
        fake.set_delay("/api/flows/*/logs", 0.3, method="POST")
        run_id = fake.trigger("Chatter Flow")
        fake.wait_for(lambda: finished(fake, run_id), 50)
        run = fake.run(run_id)
        assert run["state"] == "COMPLETED", run["logs"][-3:]
        assert fake.watchdog_failures == 0

        mine = run_requests(fake, run_id)
        start, end = mine[0].time, mine[-1].time
        beats = [r.time for r in fake.requests_to("/api/heartbeat", "POST")]
        before = [t for t in beats if t <= start]
        assert before
        marks = [before[-1]] + [t for t in beats if start < t <= end] + [end]
        gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        assert max(gaps) <= 3.5, gaps
        assert end - start > 4  # the run did last through several beats
    finally:
        stop_worker(worker)


# -- 8. concurrency ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_concurrency_two_runs_execute_at_the_same_time(fake, flows_module, tmp_path):
    worker = start_worker(fake.url, flows_module, tmp_path, "--concurrency", "2")
    try:
        registered(fake)
        add_library_entry(fake, "Hold Flow")
        run_ids = [fake.trigger("Hold Flow"), fake.trigger("Hold Flow")]
        # Neither task can finish before the release: both started means both ran at once.
        fake.wait_for(lambda: len(hold_started(tmp_path)) == 2, 20)
        assert not any(finished(fake, r) for r in run_ids)
        (tmp_path / "release").write_text("")
        fake.wait_for(lambda: all(finished(fake, r) for r in run_ids), 30)
        assert [fake.run(r)["state"] for r in run_ids] == ["COMPLETED", "COMPLETED"]
    finally:
        stop_worker(worker)


@pytest.mark.timeout(60)
def test_concurrency_one_does_not_poll_while_busy(fake, flows_module, tmp_path):
    worker = start_worker(fake.url, flows_module, tmp_path, "--concurrency", "1")
    try:
        registered(fake)
        run_id = fake.trigger("Hold Flow")
        fake.wait_for(lambda: hold_started(tmp_path), 20)
        running = fake.wait_for(lambda: next(
            (r for r in run_requests(fake, run_id) if r.path.endswith("/tasks/0/state")), None),
            10)
        # Stay busy through two heartbeats (> one 2 s poll hold).
        fake.wait_for(lambda: len([r for r in fake.requests_to("/api/heartbeat", "POST")
                                   if r.time > running.time]) >= 2, 10)
        (tmp_path / "release").write_text("")
        fake.wait_for(lambda: finished(fake, run_id), 20)
        assert fake.run(run_id)["state"] == "COMPLETED"
        complete = next(r for r in run_requests(fake, run_id) if r.path.endswith("/complete"))
        polls = [r for r in fake.requests_to("/api/execution-requests", "GET")
                 if running.time <= r.time <= complete.time]
        assert polls == [], "\n".join(f"{r.time - running.time:.3f} {r.method} {r.path} {r.status}"
                             for r in fake.requests if r.time >= running.time - 3)
        # Free again: it polls again.
        fake.wait_for(lambda: [r for r in fake.requests_to("/api/execution-requests", "GET")
                               if r.time > complete.time], 10)
    finally:
        stop_worker(worker)
