"""Ctrl-C and SIGTERM in local mode, sent to a real `python -m perfect_runner` once a
task says it started: the running task is interrupted (its `finally` runs), the run is
summarised and recorded, the exit code is 130 (143), a second Ctrl-C stops at once, no
KeyboardInterrupt traceback is printed, and nothing the runner started is left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, host_pid, is_gone

FLOWS = '''
import os, signal, subprocess, sys, time
from pathlib import Path
from perfect_runner import task, flow

MARKS = Path({marks!r})

@task
def fetch():
    print("fetched")

@task
def crunch():
    if os.environ.get("IGNORE_SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    helper = subprocess.Popen(["sleep", "60"])
    (MARKS / "crunch.pids").write_text(f"{{os.getpid()}} {{helper.pid}}")
    print("crunch started", flush=True)
    try:
        time.sleep(60)
    finally:
        print("crunch cleaned up", flush=True)

@task
def publish():
    pass

@flow(name="Nightly")
def nightly():
    fetch()
    crunch()
    publish()

@flow(name="Weekly")
def weekly():
    publish()
'''


def launch(tmp_path: Path, flows: Path, *args: str, **env_extra: str) -> subprocess.Popen:
    """`python -m perfect_runner --flows FLOWS --run-all ARGS`, output in out.txt."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERFECT_")}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **env_extra)
    with open(tmp_path / "out.txt", "w") as out:
        # Its own session, as a shell job: the signal goes to its whole process group,
        # as a terminal's Ctrl-C does.
        return subprocess.Popen(
            [sys.executable, "-m", "perfect_runner", "--flows", str(flows), "--run-all",
             *args], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)


def start(tmp_path: Path, *extra: str, ignore_sigint: bool = False) -> subprocess.Popen:
    flows = tmp_path / "nightly_flows.py"
    flows.write_text(FLOWS.format(marks=str(tmp_path)))
    env_extra = {"IGNORE_SIGINT": "1"} if ignore_sigint else {}
    return launch(tmp_path, flows, "--reports-dir", str(tmp_path / "reports"),
                  "--log-dir", str(tmp_path / "logs"), *extra, **env_extra)


def wait_for_file(path: Path, proc: subprocess.Popen) -> None:
    end = time.monotonic() + 20
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < end, output(path.parent)
        time.sleep(0.02)


def wait_until_crunch_runs(tmp_path: Path, proc: subprocess.Popen) -> list[int]:
    """The pids of the task and of its helper, once the task has said it started."""
    marks = tmp_path / "crunch.pids"
    end = time.monotonic() + 20
    while not (marks.exists() and marks.read_text().strip()):
        assert proc.poll() is None, (tmp_path / "out.txt").read_text()
        assert time.monotonic() < end, "the task never started"
        time.sleep(0.02)
    return [int(pid) for pid in marks.read_text().split()]


def everything_started(proc: subprocess.Popen, task_pids: list[int]) -> list[int]:
    # The task reported its pids as it sees them (inside the sandbox: its namespace's).
    return [p.pid for p in psutil.Process(proc.pid).children(recursive=True)] + [
        host_pid(pid, under=proc.pid) for pid in task_pids]


def assert_all_gone(pids: list[int], limit: float = 5.0) -> None:
    end = time.monotonic() + limit
    while [p for p in pids if not is_gone(p)] and time.monotonic() < end:
        time.sleep(0.02)
    assert [p for p in pids if not is_gone(p)] == []


def output(tmp_path: Path) -> str:
    return (tmp_path / "out.txt").read_text()


def the_record(tmp_path: Path) -> dict:
    (path,) = (tmp_path / "reports").glob("Nightly_*.json")
    return json.loads(path.read_text())


@pytest.mark.timeout(60)
def test_ctrl_c_interrupts_the_run_and_writes_everything(tmp_path):
    proc = start(tmp_path)
    pids = everything_started(proc, wait_until_crunch_runs(tmp_path, proc))
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(20) == 130
    assert_all_gone(pids)
    text = output(tmp_path)
    assert "crunch cleaned up" in text  # KeyboardInterrupt in the task: its finally ran
    assert "KeyboardInterrupt" not in text and "Traceback" not in text, text
    summary = text.split("==> Nightly: run", 2)[2]
    assert "interrupted by Ctrl-C (SIGINT)" in summary
    rows = {line.split()[1]: line.split()[2] for line in summary.splitlines()
            if line.startswith("    ") and len(line.split()) > 2}
    assert rows["fetch"] == "COMPLETED" and rows["crunch"] == "INTERRUPTED"
    assert rows["publish"] == "NOT"  # "NOT RUN"
    assert "Ctrl-C (SIGINT): 1 flow(s) not run: 'Weekly'" in text
    record = the_record(tmp_path)
    assert record["state"] == "FAILED" and record["note"] == "interrupted by Ctrl-C (SIGINT)"
    assert [(t["name"], t["note"]) for t in record["tasks"]] == [
        ("fetch", ""), ("crunch", "interrupted by Ctrl-C (SIGINT)")]
    assert record["not_run"] == ["publish"]
    assert list((tmp_path / "reports").glob("Nightly_*.html"))
    (log,) = (tmp_path / "logs").glob("*.log")
    assert "interrupted" in log.read_text().strip().splitlines()[-1]


@pytest.mark.timeout(60)
def test_sigterm_interrupts_the_same_way_with_exit_code_143(tmp_path):
    proc = start(tmp_path)
    pids = everything_started(proc, wait_until_crunch_runs(tmp_path, proc))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 143
    assert_all_gone(pids)
    assert the_record(tmp_path)["note"] == "interrupted by SIGTERM"
    assert "Traceback" not in output(tmp_path)


@pytest.mark.timeout(60)
def test_second_ctrl_c_stops_at_once_and_leaves_nothing(tmp_path):
    # The task ignores SIGINT and the grace is long: only the second Ctrl-C ends it.
    proc = start(tmp_path, "--kill-grace", "30", ignore_sigint=True)
    pids = everything_started(proc, wait_until_crunch_runs(tmp_path, proc))
    os.killpg(proc.pid, signal.SIGINT)
    end = time.monotonic() + 10
    while "Ctrl-C again stops at once" not in output(tmp_path):
        assert time.monotonic() < end, output(tmp_path)
        time.sleep(0.02)
    assert proc.poll() is None  # still in its grace
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(10) == 130
    assert time.monotonic() - started < 5
    assert_all_gone(pids)
    assert "Traceback" not in output(tmp_path)


@pytest.mark.timeout(60)
def test_a_task_that_ignores_ctrl_c_is_killed_after_the_grace(tmp_path):
    proc = start(tmp_path, "--kill-grace", "0.5", ignore_sigint=True)
    pids = everything_started(proc, wait_until_crunch_runs(tmp_path, proc))
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(20) == 130
    assert 0.5 <= time.monotonic() - started < 10
    assert_all_gone(pids)
    assert "crunch cleaned up" not in output(tmp_path)  # SIGKILL: no finally
    assert the_record(tmp_path)["tasks"][1]["note"] == "interrupted by Ctrl-C (SIGINT)"


BODY = '''
import time
from pathlib import Path
from perfect_runner import task, flow

@task
def never():
    pass

@flow(name="Thinking")
def thinking():
    Path({mark!r}).write_text("thinking")
    time.sleep(60)
    never()
'''


@pytest.mark.timeout(60)
def test_ctrl_c_while_the_flow_body_runs_outside_any_task(tmp_path):
    flows = tmp_path / "body_flows.py"
    flows.write_text(BODY.format(mark=str(tmp_path / "thinking")))
    proc = launch(tmp_path, flows, "--reports-dir", str(tmp_path / "reports"),
                  "--log-dir", str(tmp_path / "logs"))
    wait_for_file(tmp_path / "thinking", proc)
    pids = everything_started(proc, [])
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(20) == 130
    assert_all_gone(pids)
    (path,) = (tmp_path / "reports").glob("Thinking_*.json")
    record = json.loads(path.read_text())
    assert record["note"] == "interrupted by Ctrl-C (SIGINT)" and record["not_run"] == ["never"]
    assert "Traceback" not in output(tmp_path)


@pytest.mark.timeout(60)
def test_ctrl_c_while_the_flows_module_loads(tmp_path):
    flows = tmp_path / "slow_import_flows.py"
    flows.write_text(f"import time\nfrom pathlib import Path\n"
                     f"Path({str(tmp_path / 'importing')!r}).write_text('x')\ntime.sleep(60)\n")
    proc = launch(tmp_path, flows)
    wait_for_file(tmp_path / "importing", proc)
    pids = everything_started(proc, [])
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(20) == 130
    assert_all_gone(pids)
    assert output(tmp_path).strip() == "perfect-runner: interrupted"


RETRY = '''
import time
from pathlib import Path
from perfect_runner import task, flow

@task(retries=3, retry_delay=60)
def flaky():
    Path({mark!r}).open("a").write("attempt\\n")
    raise OSError("disk busy")

@flow(name="Retry")
def retry():
    flaky()
'''


@pytest.mark.timeout(60)
def test_ctrl_c_during_a_retry_delay_starts_no_further_attempt(tmp_path):
    flows = tmp_path / "retry_flows.py"
    mark = tmp_path / "attempts"
    flows.write_text(RETRY.format(mark=str(mark)))
    proc = launch(tmp_path, flows, "--reports-dir", str(tmp_path / "reports"),
                  "--log-dir", str(tmp_path / "logs"))
    wait_for_file(mark, proc)
    end = time.monotonic() + 10
    while "retrying" not in output(tmp_path):  # in its 60 s delay now
        assert time.monotonic() < end, output(tmp_path)
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(20) == 130
    assert mark.read_text() == "attempt\n"
    (path,) = (tmp_path / "reports").glob("Retry_*.json")
    record = json.loads(path.read_text())
    assert record["note"] == "interrupted by Ctrl-C (SIGINT)"
    assert record["tasks"][0]["note"] == "OSError: disk busy"
