"""The flow executor: task semantics (crucial or not), indexes, retries,
progress, the events listeners see, and failures of the flow itself."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import Recorder, descendants, is_gone

from perfect_runner.executor.engine import FlowExecutor
from perfect_runner.executor.options import RunOptions

CRUCIAL = """
@task
def first():
    print("first ran")
    return TaskResult(passed=True, note="fine", table=[{"rows": 3}])


@task
def validate():
    return TaskResult(passed=False, note="3 checks failed", table=[{"check": "ids"}])


@task
def later():
    (TMP / "later-ran").write_text("yes")
    return TaskResult(passed=True)


@flow("crucial")
def crucial():
    first()
    validate()
    print("after validate: must not be printed")
    later()
"""


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_crucial_failure_fails_the_run_and_stops_it(write_flows, run_flow, tmp_path: Path,
                                                    start_method: str) -> None:
    ran = run_flow(write_flows(CRUCIAL), "crucial", start_method)
    assert ran.record.state == "FAILED"
    assert [(t.index, t.name, t.state) for t in ran.record.tasks] == [
        (0, "first", "COMPLETED"), (1, "validate", "FAILED")]
    validate = ran.task("validate")
    assert validate.note == "3 checks failed"
    assert validate.table == [{"check": "ids"}]
    assert ran.task("first").table == [{"rows": 3}]
    assert not (tmp_path / "later-ran").exists()
    assert "after validate: must not be printed" not in ran.events.lines(None)
    assert "Task 'validate' (crucial) failed: 3 checks failed" in ran.events.logs()
    assert ran.events.of("run_finished") == ["FAILED"]


NON_CRUCIAL = """
@task(crucial_pass=False)
def soft_fail():
    return TaskResult(passed=False, note="soft", table=[{"a": 1}])


@task(crucial_pass=False)
def soft_raise():
    raise RuntimeError("not important")


@task(crucial_pass=False)
def soft_crash():
    os._exit(7)


@task
def last():
    return TaskResult(passed=True, note="last ran")


@flow("non-crucial")
def non_crucial():
    print(f"soft_fail -> {soft_fail()!r}")
    print(f"soft_raise -> {soft_raise()!r}")
    print(f"soft_crash -> {soft_crash()!r}")
    last()
"""


def test_non_crucial_failures_are_warnings_and_the_flow_goes_on(write_flows, run_flow) -> None:
    ran = run_flow(write_flows(NON_CRUCIAL), "non-crucial")
    assert ran.record.state == "COMPLETED"
    flow_lines = ran.events.lines(None, "stdout")
    assert "soft_fail -> TaskResult(passed=False, note='soft', table=[{'a': 1}])" in flow_lines
    assert "soft_raise -> None" in flow_lines
    assert "soft_crash -> None" in flow_lines
    states = [(t.name, t.state) for t in ran.events.finished()]
    assert states == [("soft_fail", "FAILED"), ("soft_raise", "FAILED"),
                      ("soft_crash", "FAILED"), ("last", "COMPLETED")]
    assert ran.task("soft_raise").note == "RuntimeError: not important"
    assert ran.task("soft_crash").note == "exited with code 7 before returning a result"
    warnings = [line for level, line in ran.events.of("runner_log") if level == "warning"]
    assert "Task 'soft_raise' (non-crucial) failed: RuntimeError: not important" in warnings


AFTER_FAILURE = """
@task
def boom():
    raise ValueError("crucial boom")


@task
def never():
    (TMP / "never-ran").write_text("yes")


@flow("after failure")
def after_failure():
    try:
        boom()
    except ValueError:
        print("caught the crucial failure")
    try:
        never()
    except Exception as exc:
        print(f"then: {type(exc).__name__}: {exc}")
"""


def test_no_task_runs_after_a_crucial_failure_even_if_the_body_catches_it(
        write_flows, run_flow, tmp_path: Path) -> None:
    ran = run_flow(write_flows(AFTER_FAILURE), "after failure")
    assert ran.record.state == "FAILED"
    assert [t.name for t in ran.record.tasks] == ["boom"]
    assert not (tmp_path / "never-ran").exists()
    assert ("then: TaskFailed: Task 'never' failed: the flow already failed; no more tasks run"
            in ran.events.lines(None))


LOOP = """
@task
def step(n):
    print(f"step {n} in {os.getpid()}")
    return n * 10


@task
def total(values):
    return TaskResult(passed=True, note=str(sum(values)))


@flow("loop")
def loop():
    values = [step(n) for n in range(3)]
    total(values)
    step(99)
"""


def test_dynamic_indexes_count_every_call(write_flows, run_flow) -> None:
    ran = run_flow(write_flows(LOOP), "loop")
    assert [(t.index, t.name) for t in ran.events.finished()] == [
        (0, "step"), (1, "step"), (2, "step"), (3, "total"), (4, "step")]
    assert [t.index for t in ran.events.of("task_started")] == [0, 1, 2, 3, 4]
    assert ran.task("total").note == "30"
    pids = set()
    for index, n in [(0, 0), (1, 1), (2, 2), (4, 99)]:
        (line,) = ran.events.lines(index, "stdout")
        assert line.startswith(f"step {n} in ")
        pids.add(line.rsplit(" ", 1)[1])
    assert len(pids) == 4  # a fresh process per call
    # The static task list (from the AST) names each task once, in call order.
    assert [t.name for t in ran.executor.flow_tasks("loop")] == ["step", "total"]


RETRY = """
@task(retries=1)
def flaky():
    counter = TMP / "attempts"
    attempt = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(attempt))
    print(f"attempt {attempt}")
    if attempt == 1:
        raise RuntimeError("first attempt fails")
    return TaskResult(passed=True, note=f"passed on attempt {attempt}")


@task(retries=2)
def hopeless():
    sys.exit(4)


@flow("retry")
def retry():
    flaky()


@flow("hopeless")
def hopeless_flow():
    hopeless()
"""


def test_retry_reports_retrying_then_completed(write_flows, run_flow) -> None:
    ran = run_flow(write_flows(RETRY), "retry")
    kinds = [kind for kind, _ in ran.events.events
             if kind in ("task_started", "task_retrying", "task_finished")]
    assert kinds == ["task_started", "task_retrying", "task_finished"]
    (retrying,) = ran.events.of("task_retrying")
    assert retrying.state == "RETRYING"
    assert retrying.note == "attempt 1 failed: RuntimeError: first attempt fails"
    flaky = ran.task("flaky")
    assert (flaky.index, flaky.state, flaky.attempts) == (0, "COMPLETED", 2)
    assert flaky.note == "passed on attempt 2"
    assert ran.events.lines(0, "stdout") == ["attempt 1", "attempt 2"]
    assert ran.record.state == "COMPLETED"


def test_retries_exhausted_fail_with_the_last_note(write_flows, run_flow) -> None:
    ran = run_flow(write_flows(RETRY), "hopeless")
    assert len(ran.events.of("task_retrying")) == 2
    hopeless = ran.task("hopeless")
    assert (hopeless.state, hopeless.attempts) == ("FAILED", 3)
    assert hopeless.note == "called sys.exit(4) before returning a result"
    assert ran.record.state == "FAILED"


PROGRESS = """
@task(estimated_time=60000)
def train():
    for value in (42, 77):
        report_progress(value)
        wait_for_file(TMP / f"seen-{value}")
    return TaskResult(passed=True)


@flow("progress")
def progress():
    train()
"""


def test_report_progress_values_reach_task_progress_events(write_flows, run_flow,
                                                           tmp_path: Path) -> None:
    def on_event(kind: str, data) -> None:
        if kind == "task_progress":
            (tmp_path / f"seen-{data.progress}").touch()

    ran = run_flow(write_flows(PROGRESS), "progress",
                   options=RunOptions(progress_interval=0.02), listener=Recorder(on_event))
    values = [t.progress for t in ran.events.of("task_progress")]
    assert 42 in values and 77 in values
    assert values.index(42) < values.index(77)
    assert ran.task("train").progress == 100


EVENTS = """
@task
def one():
    print("out line")
    print("err line", file=sys.stderr)
    return TaskResult(passed=True)


@flow("events", description="d", tags={"team": "core"})
def events():
    print("body line")
    one()
"""


def test_events_come_in_order_and_carry_the_record(write_flows, run_flow) -> None:
    ran = run_flow(write_flows(EVENTS), "events")
    kinds = [kind for kind, _ in ran.events.events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.index("task_started") < kinds.index("task_finished")
    assert ran.events.logs()[0] == "Starting flow: events"
    assert ran.events.logs()[-1].startswith("Flow finished: events (1 tasks, ")
    one = ran.task("one")
    assert one.state == "COMPLETED" and one.passed is True and one.progress == 100
    assert one.duration_ms is not None and one.peak_rss and one.peak_rss > 0
    assert ran.events.lines(0, "stdout") == ["out line"]
    assert ran.events.lines(0, "stderr") == ["err line"]
    assert ran.record.tags == {"team": "core"} and ran.record.description == "d"
    assert ran.record.run_id.startswith("local-")


ORDER = """
@task
def first():
    print("first's line", flush=True)
    return 1


@task(crucial_pass=False)
def second():
    raise ValueError("second fails")


@flow("order")
def order():
    print("before", flush=True)
    first()
    print("between", flush=True)
    try:
        second()
    finally:
        print("after", flush=True)
    first()
"""


def test_each_call_is_told_whole_before_what_the_flow_does_next(write_flows, run_flow) -> None:
    # The flow process gets its answer before the listeners hear of the call's end;
    # they must still hear of it before anything the flow body does after the call.
    ran = run_flow(write_flows(ORDER), "order")
    seen = []
    for kind, data in ran.events.events:
        if kind in ("task_started", "task_finished"):
            seen.append(f"{kind} {data.name} {data.state}")
        elif kind == "task_output" and data[1] == "stdout":
            seen += [f"line {line}" for line in data[2]]
        elif kind == "runner_log" and "failed" in data[1]:
            seen.append(f"log {data[1]}")
    assert seen == [
        "line before",
        "task_started first RUNNING", "line first's line", "task_finished first COMPLETED",
        "line between",
        "task_started second RUNNING",
        "log Task 'second' (non-crucial) failed: ValueError: second fails",
        "task_finished second FAILED",
        "line after",
        "task_started first RUNNING", "line first's line", "task_finished first COMPLETED",
    ], seen


FLOW_FAILURES = """
@task
def fine():
    return TaskResult(passed=True)


@flow("body raises")
def body_raises():
    fine()
    raise RuntimeError("not from a task")


@flow("body exits")
def body_exits():
    fine()
    os._exit(5)


@task
def slow():
    print("slow started", flush=True)
    time.sleep(60)


@flow("flow timeout", timeout=1)
def flow_timeout():
    slow()
"""


def test_flow_body_raising_is_reported_as_a_flow_task(write_flows, run_flow) -> None:
    ran = run_flow(write_flows(FLOW_FAILURES), "body raises")
    assert ran.record.state == "FAILED"
    assert [(t.name, t.state) for t in ran.record.tasks] == [("fine", "COMPLETED"),
                                                              ("flow", "FAILED")]
    assert ran.record.tasks[1].note == "flow body raised RuntimeError: not from a task"
    assert any("Traceback" in line and "not from a task" in line for line in ran.events.logs())


def test_flow_process_death_is_reported(write_flows, run_flow) -> None:
    ran = run_flow(write_flows(FLOW_FAILURES), "body exits")
    assert ran.record.state == "FAILED"
    assert ran.record.tasks[-1].name == "flow"
    assert ran.record.tasks[-1].note == "flow process exited with code 5 before the flow finished"


def test_flow_timeout_stops_the_running_task(write_flows, run_flow) -> None:
    ran = run_flow(write_flows(FLOW_FAILURES), "flow timeout")
    assert ran.record.state == "FAILED"
    assert ran.record.note == "flow timed out after 1.0 s"
    slow = ran.task("slow")
    assert (slow.state, slow.note) == ("FAILED", "stopped: the flow timed out after 1.0 s")
    assert slow.duration_ms < 5000


CANCEL = """
@task
def wait():
    print("waiting", flush=True)
    time.sleep(60)


@flow("cancel")
def cancel():
    wait()
"""


def test_cancel_from_another_thread_kills_the_task(write_flows) -> None:
    before = {p.pid for p in descendants()}
    executor = FlowExecutor([str(write_flows(CANCEL))])
    try:
        holder = {}

        def on_event(kind: str, data) -> None:
            if kind == "task_output" and "waiting" in data[2]:
                thread = threading.Thread(target=holder["run"].cancel, args=("user asked",))
                thread.start()

        run = executor.new_run("cancel", Recorder(on_event))
        holder["run"] = run
        record = run.execute()
        assert record.state == "FAILED"
        assert record.note == "cancelled: user asked"
    finally:
        executor.close()
    assert [p for p in descendants() if p.pid not in before and not is_gone(p.pid)] == []


def test_run_options_set_task_defaults(write_flows, run_flow) -> None:
    source = """
    @task
    def sleepy():
        time.sleep(60)


    @flow("defaults")
    def defaults():
        sleepy()
    """
    ran = run_flow(write_flows(source), "defaults",
                   options=RunOptions(task_timeout=0.5, kill_grace=0.2))
    assert ran.task("sleepy").note == "timed out after 0.5 s"


def test_tables_are_made_json_safe_in_the_child(write_flows, run_flow) -> None:
    source = """
    class Thing:
        def __str__(self):
            return "a thing"


    @task
    def odd_table():
        return TaskResult(passed=True, note="n", table=[
            {"nan": float("nan"), "obj": Thing(), "nested": {1: (1, 2)}}])


    @flow("table")
    def table():
        odd_table()
    """
    ran = run_flow(write_flows(source), "table")
    assert ran.task("odd_table").table == [{"nan": "NaN", "obj": "a thing",
                                            "nested": {"1": [1, 2]}}]


WORKER_RETRIES = '''
import os
from pathlib import Path
from perfect_runner import task, flow, TaskResult

def attempt(name):
    counter = Path(os.environ["COUNTER_DIR"], name)
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    return TaskResult(passed=n > 1)

@task(crucial_pass=False)
def inherits():
    return attempt("inherits")

@task(crucial_pass=False, retries=0)
def never_retried():
    return attempt("never")

@flow(name="retry defaults")
def retry_defaults():
    inherits()
    never_retried()
'''


def test_explicit_retries_0_overrides_the_worker_default(tmp_path, monkeypatch, run_flow,
                                                       write_flows):
    monkeypatch.setenv("COUNTER_DIR", str(tmp_path))
    from perfect_runner.executor.options import RunOptions

    ran = run_flow(write_flows(WORKER_RETRIES), "retry defaults",
                   options=RunOptions(retries=1))
    states = {t.name: (t.state, t.attempts) for t in ran.record.tasks}
    assert states == {"inherits": ("COMPLETED", 2), "never_retried": ("FAILED", 1)}
