"""Every failure while the control process handles a run is contained to that run.

The test-only fault hook (`perfect_runner.fault_injection`, armed through
PERFECT_RUNNER_TEST_FAULTS at start) makes the control process raise at each
place where it handles a run: building it, starting it, a task call, the
supervision loop, its end, each kind of listener, the worker's sender thread.
Each faulty flow's run must end FAILED with a note naming what broke, its
processes killed; the other runs go on (local mode: reports written, exit
code 1; worker mode: states at the backend, the flow registered again, the
worker serving on). Every fault is followed by a healthy run whose task
checks that no process of the faulty run is still alive.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import Recorder, is_gone_in, left_below, run_cli
from fake_perfect import FakePerfect
from worker_process import start_worker, stop_worker, worker_output

from perfect_runner.executor.events import FanOut, GuardedListener, ListenerError, NullListener
from perfect_runner.executor.records import RunRecord, TaskRecord
from perfect_runner.fault_injection import ENV

# Places whose flow must reach the end of a task (the others hold a task running).
FINISHING = ("flow_run.finish", "task_finished", "local.report")

COMMON = ["engine.new_run", "flow_run.start", "flow_run.call_task", "supervisor.watch",
          "flow_run.finish", "listener.LogFileListener.run_started",
          "listener.LogFileListener.task_output"]
LOCAL = COMMON + ["listener.TerminalView.task_started", "listener.TerminalView.task_finished",
                  "local.report"]
WORKER = COMMON + ["listener.BackendListener.task_started", "listener.WorkerLog.task_finished",
                   "listener.BackendListener.runner_log", "sender.deliver"]

FLOWS = '''
import os
import time
from pathlib import Path

from perfect_runner import TaskResult, flow, task

MARK = Path({tmp!r})


def alive(pid):
    try:
        state = Path(f"/proc/{{pid}}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@task(estimated_time=100)
def quick():
    left = [p.name for p in MARK.glob("work-*") if alive(int(p.name[5:]))]
    return TaskResult(passed=True, note=f"left running: {{left or 'none'}}")


@task(estimated_time=100)
def work():
    (MARK / f"work-{{os.getpid()}}").write_text(os.readlink("/proc/self/ns/pid"))
    print("working", flush=True)
    time.sleep(30)  # a faulty run never gets this far: its processes are killed


@flow(name="Fine")
def fine():
    quick()
'''

FAULTY = '''

@flow(name="Fault {place}")
def fault_{number}():
    {body}()
'''


def flows_module(tmp_path: Path, places: list[str]) -> Path:
    source = FLOWS.format(tmp=str(tmp_path))
    for number, place in enumerate(places):
        body = "quick" if place.endswith(FINISHING) else "work"
        source += FAULTY.format(place=place, number=number, body=body)
    path = tmp_path / "contained_flows.py"
    path.write_text(textwrap.dedent(source))
    return path


def armed(places: list[str]) -> dict[str, str]:
    return {ENV: ",".join(f"{place}@Fault {place}" for place in places)}


def work_pids(tmp_path: Path) -> list[tuple[str, int]]:
    """(PID namespace, pid there) of every `work` task process so far."""
    return [(p.read_text(), int(p.name[5:])) for p in tmp_path.glob("work-*")]


def notes(tasks: list[dict], run_note: str = "") -> str:
    return " | ".join([run_note, *(t["note"] for t in tasks)])


@pytest.mark.timeout(90)
def test_local_mode_a_fault_anywhere_fails_only_its_run(tmp_path: Path) -> None:
    module = flows_module(tmp_path, LOCAL)
    args = ["--flows", str(module), "--progress-interval", "0.2"]
    for place in LOCAL:
        args += ["--run", f"Fault {place}", "--run", "Fine"]
    result = run_cli(*args, cwd=tmp_path, env=armed(LOCAL), timeout=80)

    assert result.code == 1, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "reports").glob("*.json")]
    by_flow: dict[str, list[dict]] = {}
    for record in sorted(records, key=lambda r: r["started_at"] or 0):
        by_flow.setdefault(record["flow_name"], []).append(record)
    for place in LOCAL:
        (record,) = by_flow[f"Fault {place}"]
        said = notes(record["tasks"], record["note"])
        assert record["state"] == "FAILED", (place, said)
        assert f"injected fault at {place}" in said, (place, said)
        assert not [t for t in record["tasks"] if t["state"] not in ("COMPLETED", "FAILED")]
        printed = [line for line in result.stdout.splitlines()
                   if line.startswith(f"Fault {place}: FAILED  report: ")]
        assert printed, place
    # Every healthy run after a fault completed, and saw nothing of it still running.
    fine = by_flow["Fine"]
    assert [r["state"] for r in fine] == ["COMPLETED"] * len(LOCAL)
    assert {r["tasks"][0]["note"] for r in fine} == {"left running: none"}
    # The task processes that were running when their run failed were killed.
    assert len(work_pids(tmp_path)) >= 2  # supervisor.watch, task_output
    assert all(is_gone_in(*work) for work in work_pids(tmp_path))
    assert "the runner failed while handling this run" in result.stderr


@pytest.mark.timeout(90)
def test_worker_a_fault_anywhere_fails_only_its_run_at_the_backend(tmp_path: Path) -> None:
    module = flows_module(tmp_path, WORKER)
    with FakePerfect(poll_hold=1.0) as fake:
        worker = start_worker(fake.url, module, tmp_path, env=armed(WORKER))
        try:
            fake.wait_for(lambda: len(fake.flows) == len(WORKER) + 1, 20)
            for place in WORKER:
                check_faulty_run(fake, f"Fault {place}", place)
                check_fine_run(fake)
            assert worker.poll() is None
            assert all(is_gone_in(*work) for work in work_pids(tmp_path))
            assert left_below(worker.pid) == []
        finally:
            stop_worker(worker)
    assert "the runner failed while handling this run" in worker_output(tmp_path)


def check_faulty_run(fake: FakePerfect, flow: str, place: str) -> None:
    run_id = fake.trigger(flow)
    fake.wait_for(lambda: fake.run(run_id)["state"] in ("COMPLETED", "FAILED"), 20)
    run = fake.run(run_id)
    said = notes([t["result"] or {"note": ""} for t in run["tasks"]])
    assert run["state"] == "FAILED", (place, said)
    assert f"injected fault at {place}" in said, (place, said)
    assert not [t for t in run["tasks"] if t["state"] not in ("COMPLETED", "FAILED")], run
    completes = fake.wait_for(lambda: [r for r in fake.requests
                                       if r.path == f"/api/runs/{run_id}/complete"], 10)
    assert completes[-1].body == {"taskCount": len(run["tasks"])}
    # Registered again: the run consumed its library entry.
    fake.wait_for(lambda: any(f["name"] == flow for f in fake.flows), 10)


def check_fine_run(fake: FakePerfect) -> None:
    run_id = fake.trigger("Fine")
    fake.wait_for(lambda: fake.run(run_id)["state"] in ("COMPLETED", "FAILED"), 20)
    run = fake.run(run_id)
    assert run["state"] == "COMPLETED", run["tasks"]
    assert run["tasks"][0]["result"]["note"] == "left running: none"
    fake.wait_for(lambda: any(f["name"] == "Fine" for f in fake.flows), 10)


class Broken(NullListener):
    def task_started(self, run: RunRecord, task: TaskRecord) -> None:
        raise OSError(28, "No space left on device")


def test_a_raising_listener_does_not_keep_the_event_from_the_others() -> None:
    # Given a fan-out whose first listener raises
    recorder = Recorder()
    fan_out = FanOut(Broken(), recorder)
    run, task = RunRecord(run_id="r", flow_name="f"), TaskRecord(index=0, name="t")
    # When an event goes out, then the others still get it, and the failure names its source
    with pytest.raises(ListenerError, match=r"Broken.task_started raised OSError: .*space"):
        fan_out.task_started(run, task)
    assert [kind for kind, _ in recorder.events] == ["task_started"]
    # And once the run is failing, the guard logs instead of raising: the end gets through
    guard = GuardedListener(fan_out)
    guard.tripped = True
    guard.task_started(run, task)
    guard.run_finished(run)
    assert [kind for kind, _ in recorder.events] == ["task_started"] * 2 + ["run_finished"]
