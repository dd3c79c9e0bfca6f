"""Many runs at once in one control process: file descriptors past 1024, and a worker
at --concurrency 16 whose runs all complete exactly once while its heartbeat keeps time.
"""

from __future__ import annotations

import os
import resource
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from fake_perfect import FakePerfect
from worker_process import start_worker, stop_worker, worker_output

FD_FLOWS = """
@task
def chatty():
    for i in range(300):
        print(f"line {i}")
    return TaskResult(passed=True, note="printed")


@flow("high fds")
def high_fds():
    chatty()
    chatty()
"""


@pytest.fixture
def fds_past_1024():
    """Hold open files until the next fd number is past 1024, as a worker running ~64 runs
    at once does (each run holds ~16: pipes, channels, pidfds, its log file, a socket)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1400")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
    held = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_run_whose_fds_are_past_1024_completes(fds_past_1024, write_flows, run_flow):
    # select() refuses fd numbers >= 1024 (FD_SETSIZE); every pipe, channel and pidfd
    # of this run is past it, so each wait on them must not use select.
    ran = run_flow(write_flows(FD_FLOWS), "high fds")
    assert ran.record.state == "COMPLETED", [t.note for t in ran.record.tasks]
    assert [t.note for t in ran.record.tasks] == ["printed", "printed"]
    assert ran.events.lines(0) == [f"line {i}" for i in range(300)]
    assert ran.events.lines(1)[-1] == "line 299"




# -- a worker running many runs at once ------------------------------------------------

RUNS, TASKS, LINES = 16, 4, 300
FLOWS = textwrap.dedent(f'''
    import os, time, uuid
    from pathlib import Path
    from perfect_runner import flow, task

    MARK = Path(os.environ["MARKER_DIR"])


    @task(name="wait for all")
    def wait_for_all():
        (MARK / f"started-{{os.getpid()}}").write_text("")
        while not (MARK / "release").exists():
            time.sleep(0.01)


    @task(name="chatty")
    def chatty(token, index):
        with open(MARK / "calls", "a") as out:
            out.write(f"{{token}} {{index}}\\n")
        for i in range({LINES}):
            print(f"task {{index}} line {{i}}")


    @flow(name="Many")
    def many():
        token = uuid.uuid4().hex
        wait_for_all()
        for index in range({TASKS}):
            chatty(token, index)
''')


@pytest.fixture
def many_module(tmp_path: Path) -> Path:
    path = tmp_path / "many_flows.py"
    path.write_text(FLOWS)
    return path


def _run_over(fake: FakePerfect, run_id: str) -> bool:
    path = f"/api/runs/{run_id}/complete"
    return (fake.run(run_id)["state"] in ("COMPLETED", "FAILED")
            and any(r.path == path and r.status is not None for r in fake.requests))


@pytest.mark.timeout(60)
def test_sixteen_runs_at_once_each_completes_exactly_once_and_heartbeats_keep_time(
        fake, many_module, tmp_path):
    worker = start_worker(fake.url, many_module, tmp_path, "--concurrency", str(RUNS))
    try:
        fake.wait_for(lambda: any(f["name"] == "Many" for f in fake.flows), 20)
        body = {"name": "Many", "tasks": [{"name": "chatty", "estimatedTime": 100}] * TASKS}
        for _ in range(RUNS - 1):  # one entry per trigger (a run consumes its entry)
            requests.post(f"{fake.url}/api/flows", json=body, timeout=5).raise_for_status()
        start = time.monotonic()
        run_ids = [fake.trigger("Many") for _ in range(RUNS)]
        # Every run's first task waits until all of them started: 16 runs at once.
        fake.wait_for(lambda: len(list(tmp_path.glob("started-*"))) == RUNS, 30)
        # One beat while all 16 are live, so the heartbeat window spans 2+ intervals.
        live = time.monotonic()
        fake.wait_for(lambda: [r for r in fake.requests_to("/api/heartbeat") if r.time > live],
                      5)
        (tmp_path / "release").write_text("")
        fake.wait_for(lambda: all(_run_over(fake, r) for r in run_ids), 40)
        end = time.monotonic()
        fake.wait_for(lambda: [r for r in fake.requests_to("/api/heartbeat") if r.time > end], 5)
        assert worker.poll() is None, worker_output(tmp_path)
    finally:
        stop_worker(worker)
    assert worker.returncode == 0, worker_output(tmp_path)
    for run_id in run_ids:
        run = fake.run(run_id)
        assert run["state"] == "COMPLETED", (run_id, run["tasks"])
        assert [t["state"] for t in run["tasks"]] == ["COMPLETED"] * (TASKS + 1)
        completes = fake.requests_to(f"/api/runs/{run_id}/complete", "POST")
        assert [r.body for r in completes] == [{"taskCount": TASKS + 1}]
    calls = Counter((tmp_path / "calls").read_text().split("\n")[:-1])
    assert len(calls) == RUNS * TASKS and set(calls.values()) == {1}
    assert sorted({c.split()[1] for c in calls}) == [str(i) for i in range(TASKS)]
    # The heartbeat kept its 3 s through it all (from the last beat before the first
    # trigger to the first after the last run's end).
    beats = [r.time for r in fake.requests_to("/api/heartbeat", "POST")]
    window = [t for t in beats if t <= start][-1:] + [t for t in beats if t > start]
    window = [t for t in window if t <= end] + [t for t in window if t > end][:1]
    gaps = [b - a for a, b in zip(window, window[1:], strict=False)]
    assert gaps and max(gaps) <= 3.5, gaps


def _open_files_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files limit")


def _limit_open_files(soft: int, hard: int | None = None):
    def apply() -> None:
        _, current_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, current_hard if hard is None
                                                    else hard))
    return apply


def test_worker_raises_a_low_open_files_limit_for_its_concurrency(fake, many_module,
                                                                   tmp_path):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 500:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 500")
    worker = start_worker(fake.url, many_module, tmp_path, "--concurrency", "16",
                          preexec_fn=_limit_open_files(256))
    try:
        fake.wait_for(lambda: any(f["name"] == "Many" for f in fake.flows), 20)
        assert _open_files_limit(worker.pid) >= 64 + 24 * 16
    finally:
        stop_worker(worker)
    assert "open files" not in worker_output(tmp_path)


def test_worker_says_when_the_open_files_limit_is_too_low_for_its_concurrency(
        fake, many_module, tmp_path):
    worker = start_worker(fake.url, many_module, tmp_path, "--concurrency", "64",
                          preexec_fn=_limit_open_files(300, 300))
    try:
        fake.wait_for(lambda: any(f["name"] == "Many" for f in fake.flows), 20)
    finally:
        stop_worker(worker)
    assert ("--concurrency 64 needs about 1600 open files, but the limit is 300 (hard limit "
            "300): runs may fail with 'Too many open files'; raise it (ulimit -n, or "
            "LimitNOFILE= in a systemd unit) or lower --concurrency") in worker_output(tmp_path)
