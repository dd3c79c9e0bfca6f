"""The worker against the fake Perfect backend: real processes, real HTTP, real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import requests
from conftest import host_pid
from fake_perfect import FakePerfect
from worker_process import start_worker, stop_worker

FLOWS = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from perfect_runner import task, flow, TaskResult

    @task(estimated_time=200)
    def first():
        """Say hello."""
        print("hello from first")
        return TaskResult(passed=True, note="first ok", table=[{"rows": 1}])

    @task(estimated_time=200)
    def second(x=None):
        print("second line", file=sys.stderr)
        return TaskResult(passed=True, note="second ok")

    @task(estimated_time=100000)
    def slow():
        Path(os.environ["MARKER_DIR"], f"slow-{os.getpid()}").write_text("started")
        print("slow started", flush=True)
        time.sleep(600)

    @flow(name="Quick Flow", description="two tasks", tags={"team": "qa"})
    def quick():
        for _ in range(2):
            first()
        second()

    @flow(name="Slow Flow")
    def slow_flow():
        first()
        slow()
''')


@pytest.fixture
def flows_module(tmp_path: Path) -> Path:
    path = tmp_path / "worker_flows.py"
    path.write_text(FLOWS)
    return path


def descendants_of(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def finished(fake: FakePerfect, run_id: str) -> bool:
    return fake.run(run_id)["state"] in ("COMPLETED", "FAILED")


def ui_stop(fake: FakePerfect) -> None:
    """The UI's Stop button: the backend fails every RUNNING run and task at once."""
    requests.post(f"{fake.url}/api/client/stop", timeout=5).raise_for_status()


@pytest.mark.timeout(60)
def test_triggered_run_is_reported_in_order_and_flow_stays_in_library(fake, flows_module,
                                                                       tmp_path):
    worker = start_worker(fake.url, flows_module, tmp_path)
    try:
        fake.wait_for(lambda: len(fake.flows) == 2, 15)
        first_request = fake.requests[0]
        assert (first_request.method, first_request.path) == ("POST", "/api/heartbeat")
        quick = next(f for f in fake.flows if f["name"] == "Quick Flow")
        assert [t["name"] for t in quick["tasks"]] == ["first", "second"]
        assert quick["tasks"][0]["description"] == "Say hello."
        assert quick["tags"] == {"team": "qa"}

        run_id = fake.trigger("Quick Flow")
        fake.wait_for(lambda: finished(fake, run_id), 20)
        run = fake.run(run_id)
        assert run["state"] == "COMPLETED"
        assert [(t["taskName"], t["state"]) for t in run["tasks"]] == [
            ("first", "COMPLETED"), ("first", "COMPLETED"), ("second", "COMPLETED")]
        assert run["tasks"][0]["result"]["note"] == "first ok"
        logs = fake.logs(run_id)
        assert logs.count("[Task Output] first: hello from first") == 2
        assert "[Task Output][stderr] second: second line" in logs
        # Each task's COMPLETED arrives after its output and before the next RUNNING.
        posts = [r for r in fake.requests if run_id in r.path]
        states = [(r.path.split("/")[-2], r.body.get("state")) for r in posts
                  if r.path.endswith("/state")]
        assert states[0] == ("0", "RUNNING")
        done_at = [i for i, s in enumerate(states) if s[1] == "COMPLETED"]
        assert [states[i][0] for i in done_at] == ["0", "1", "2"]
        complete = [r for r in posts if r.path.endswith("/complete")]
        assert complete[-1].body == {"taskCount": 3}
        # Triggering removed the flow from the library; the worker put it back, with
        # the calls that ran (first is called twice), so the next run's rows match.
        fake.wait_for(lambda: any(f["name"] == "Quick Flow" for f in fake.flows), 10)
        quick = next(f for f in fake.flows if f["name"] == "Quick Flow")
        assert [t["name"] for t in quick["tasks"]] == ["first", "first", "second"]
        assert [t["description"] for t in quick["tasks"]][:2] == ["Say hello."] * 2
    finally:
        stop_worker(worker)
    assert worker.returncode == 0


@pytest.mark.timeout(60)
def test_unknown_flow_fails_task_zero_and_worker_goes_on(fake, flows_module, tmp_path):
    worker = start_worker(fake.url, flows_module, tmp_path)
    try:
        fake.wait_for(lambda: len(fake.flows) == 2, 15)
        # A run the backend knows from another client's registration.
        requests.post(f"{fake.url}/api/flows", timeout=5,
                      json={"name": "Someone Else's Flow", "tasks": [{"name": "x"}]})
        run_id = fake.trigger("Someone Else's Flow")
        fake.wait_for(lambda: finished(fake, run_id), 20)
        run = fake.run(run_id)
        assert run["state"] == "FAILED"
        note = ("this worker does not serve \"Someone Else's Flow\"; every worker on one "
                "backend must serve the same flows")
        assert run["tasks"][0]["result"]["note"] == note
        assert f"[perfect_runner] {note}" in fake.logs(run_id)
        ok_id = fake.trigger("Quick Flow")
        fake.wait_for(lambda: finished(fake, ok_id), 20)
        assert fake.run(ok_id)["state"] == "COMPLETED"
    finally:
        stop_worker(worker)


@pytest.mark.timeout(60)
def test_sigterm_mid_task_exits_quickly_and_leaves_nothing(fake, flows_module, tmp_path):
    worker = start_worker(fake.url, flows_module, tmp_path, "--shutdown-grace", "1")
    try:
        fake.wait_for(lambda: len(fake.flows) == 2, 15)
        run_id = fake.trigger("Slow Flow")
        fake.wait_for(lambda: list(tmp_path.glob("slow-*")), 20)
        children = descendants_of(worker.pid)
        assert children
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=10)
        assert time.monotonic() - started < 5
        assert worker.returncode == 0
        fake.wait_for(lambda: finished(fake, run_id), 5)
        slow = fake.run(run_id)["tasks"][1]
        assert slow["state"] == "FAILED"
        assert slow["result"]["note"] == "worker stopped"
        assert not [p for p in children if psutil.pid_exists(p) and
                    psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    finally:
        stop_worker(worker)


@pytest.mark.timeout(60)
def test_sigkill_of_worker_leaves_no_process(fake, flows_module, tmp_path):
    worker = start_worker(fake.url, flows_module, tmp_path)
    try:
        fake.wait_for(lambda: len(fake.flows) == 2, 15)
        fake.trigger("Slow Flow")
        fake.wait_for(lambda: list(tmp_path.glob("slow-*")), 20)
        children = descendants_of(worker.pid)
        worker.kill()
        worker.wait(5)
        gone, alive = psutil.wait_procs([psutil.Process(p) for p in children
                                         if psutil.pid_exists(p)], timeout=3)
        assert not alive
    finally:
        stop_worker(worker)


@pytest.mark.timeout(60)
def test_ui_stop_404_kills_the_running_task(fake, flows_module, tmp_path):
    worker = start_worker(fake.url, flows_module, tmp_path)
    try:
        fake.wait_for(lambda: len(fake.flows) == 2, 15)
        run_id = fake.trigger("Slow Flow")
        marker = fake.wait_for(lambda: list(tmp_path.glob("slow-*")), 20)
        task_pid = host_pid(int(marker[0].name.split("-")[1]), under=worker.pid)
        fake.wait_for(lambda: len(fake.run(run_id)["tasks"]) > 1
                      and fake.run(run_id)["tasks"][1]["state"] == "RUNNING", 10)
        ui_stop(fake)
        psutil.wait_procs([psutil.Process(task_pid)], timeout=5)
        assert not psutil.pid_exists(task_pid) or (
            psutil.Process(task_pid).status() == psutil.STATUS_ZOMBIE)
        # The worker goes on serving.
        ok_id = fake.trigger("Quick Flow")
        fake.wait_for(lambda: finished(fake, ok_id), 20)
        assert fake.run(ok_id)["state"] == "COMPLETED"
    finally:
        stop_worker(worker)


@pytest.mark.timeout(90)
def test_two_workers_never_run_the_same_run_twice(fake, flows_module, tmp_path):
    workers = [start_worker(fake.url, flows_module, tmp_path) for _ in range(2)]
    try:
        fake.wait_for(lambda: len(fake.flows) == 4, 15)
        run_ids = []
        for _ in range(6):
            # Each trigger consumes a library entry; workers re-register after each run.
            fake.wait_for(lambda: any(f["name"] == "Quick Flow" for f in fake.flows), 20)
            run_ids.append(fake.trigger("Quick Flow"))
        fake.wait_for(lambda: all(finished(fake, r) for r in run_ids), 60)
        for run_id in run_ids:
            assert fake.run(run_id)["state"] == "COMPLETED"
            assert fake.logs(run_id).count("[Task Output] first: hello from first") == 2
            completes = [r for r in fake.requests if r.path == f"/api/runs/{run_id}/complete"]
            assert len(completes) == 1
    finally:
        for worker in workers:
            stop_worker(worker)


@pytest.mark.timeout(60)
def test_run_against_server_prints_run_id_and_exits_by_outcome(fake, flows_module, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "perfect_runner", "--flows", str(flows_module), "--server",
         fake.url, "--run", "Quick Flow", "--log-dir", str(tmp_path / "logs")],
        cwd=tmp_path, capture_output=True, text=True, timeout=50,
    )
    assert result.returncode == 0, result.stderr
    run_id = next(r for r in fake.runs)
    assert f"run {run_id} COMPLETED" in result.stdout
    assert fake.run(run_id)["state"] == "COMPLETED"
