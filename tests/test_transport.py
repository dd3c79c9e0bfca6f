"""The transport layer against the fake backend over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fake_perfect import FakePerfect, Recorded

from perfect_runner.executor.records import RunRecord, TaskRecord
from perfect_runner.transport.api import (
    ApiStatus,
    BadRequest,
    ExecutionRequest,
    PerfectAPIClient,
    json_safe,
)
from perfect_runner.transport.backend_listener import BackendListener
from perfect_runner.transport.heartbeat import Heartbeat
from perfect_runner.transport.sender import RunSender

TOKEN = "s3cret-token-value"
TASKS = [{"name": "extract", "estimatedTime": 8000}, {"name": "load", "estimatedTime": 2000}]


@pytest.fixture
def fake() -> Iterator[FakePerfect]:
    with FakePerfect(poll_hold=0.3) as server:
        yield server


@pytest.fixture
def client(fake: FakePerfect) -> Iterator[PerfectAPIClient]:
    api = PerfectAPIClient(fake.url, token=TOKEN, connect_timeout=1.0, read_timeout=5.0,
                           poll_read_timeout=5.0)
    yield api
    api.close()


def new_run(client: PerfectAPIClient, name: str = "Daily Sales ETL") -> str:
    result = client.register_flow({"name": name, "tasks": TASKS})
    assert result.ok
    run_id = client.create_run(result.body["flow"]["id"])
    assert run_id
    return run_id


def sender_for(client: PerfectAPIClient, run_id: str, **options: Any) -> RunSender:
    defaults: dict[str, Any] = {"log_rate": 10_000.0, "progress_interval": 0.0,
                                "backoff_initial": 0.01, "backoff_max": 0.05}
    return RunSender(client, run_id, log_path="/tmp/run.log", **{**defaults, **options})


def run_traffic(fake: FakePerfect, run_id: str) -> list[Recorded]:
    """Requests about this run (logs, states, complete), in arrival order."""
    return [r for r in fake.requests if run_id in r.path]


def log_entries(fake: FakePerfect, run_id: str) -> list[str]:
    return [r.body["log"] for r in fake.requests_to(f"/api/flows/{run_id}/logs")]


def describe(traffic: list[Recorded]) -> list[str]:
    out = []
    for r in traffic:
        if r.path.endswith("/logs"):
            out.append("log:" + r.body["log"])
        elif r.path.endswith("/complete"):
            out.append(f"complete:{r.body['taskCount']}")
        else:
            out.append(f"{r.path.split('/')[-2]}:{r.body['state']}")
    return out


def finish(sender: RunSender, timeout: float = 10.0) -> None:
    sender.finish()
    assert sender.join(timeout), "sender did not drain"


# -- api.py ------------------------------------------------------------------


def test_json_safe_converts_what_json_cannot_hold() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    value = {"nan": math.nan, "inf": [math.inf, -math.inf], 1: {2, 3}, "b": b"\xff",
             "obj": object(), "t": (1, 2.5), "deep": cyclic}
    safe = json_safe(value)
    text = json.dumps(safe, allow_nan=False)
    assert safe["nan"] == "NaN" and safe["inf"] == ["Infinity", "-Infinity"]
    assert safe["1"] == [2, 3] and safe["t"] == [1, 2.5] and "\ufffd" == safe["b"]
    assert "object object" in text


def test_endpoints_round_trip(fake: FakePerfect, client: PerfectAPIClient) -> None:
    registered = client.register_flow({"name": "A", "tasks": TASKS})
    flow_id = registered.body["flow"]["id"]
    run_id = client.create_run(flow_id)
    assert run_id and client.create_run(flow_id) is None  # entry consumed: no runId
    table = [{"metric": "ratio", "value": math.nan}, {"metric": "cap", "value": math.inf}]
    assert client.update_task_state(run_id, 0, "RUNNING", 0, task_name="extract").ok
    done = client.update_task_state(run_id, 0, "COMPLETED", 100, duration_ms=12.7,
                                    result={"passed": True, "note": "ok", "table": table})
    assert done.ok, done.describe()
    assert client.send_log(run_id, "hello").ok
    assert client.get_report(run_id) is None
    assert client.complete_flow(run_id, 1).ok
    assert client.get_report(run_id)["url"].startswith("/Reports/A/")
    assert client.send_heartbeat().ok
    task = fake.run(run_id)["tasks"][0]
    assert task["durationMs"] == 12 and task["result"]["table"][0]["value"] == "NaN"


def test_outcomes_are_classified(fake: FakePerfect, client: PerfectAPIClient) -> None:
    assert client.update_task_state("run-nope", 0, "RUNNING").status is ApiStatus.NOT_FOUND
    bad = client.register_flow({"name": "no tasks"})
    assert bad.status is ApiStatus.CLIENT_ERROR and "tasks" in bad.body["error"]
    fake.fail_with("/api/heartbeat", 503, count=1)
    assert client.send_heartbeat().status is ApiStatus.RETRYABLE
    fake.stop()
    down = client.send_heartbeat()
    assert down.status is ApiStatus.RETRYABLE and down.http_status is None


def test_state_update_without_state_is_refused_locally(
    fake: FakePerfect, client: PerfectAPIClient
) -> None:
    with pytest.raises(ValueError):
        client.post_state("run-x", 0, {"progress": 1})
    assert fake.requests == []


def test_poll_once_accepts_valid_and_null(fake: FakePerfect, client: PerfectAPIClient) -> None:
    fake.queue_raw({"run_id": "run-1", "flow_name": "A", "configuration": "prod"})
    assert client.poll_once() == ExecutionRequest("run-1", "A", "prod")
    assert client.poll_once() is None  # the hold ended with `null`


@pytest.mark.parametrize("body", [
    b"not json",
    b"[1, 2]",
    {"flow_name": "A", "configuration": "x"},
    {"run_id": "run-1", "configuration": "x"},
    {"run_id": 5, "flow_name": "A", "configuration": "x"},
    {"run_id": "run-1", "flow_name": ["A"], "configuration": "x"},
    {"run_id": "run-1", "flow_name": "A", "configuration": 3},
    {"run_id": "r" * 257, "flow_name": "A", "configuration": "x"},
    {"run_id": "run-1", "flow_name": "A" * 10_000, "configuration": "x"},
    {"run_id": "run-1\n", "flow_name": "A", "configuration": "x"},
    {"run_id": "", "flow_name": "A", "configuration": "x"},
])
def test_malformed_execution_requests_are_rejected(
    fake: FakePerfect, client: PerfectAPIClient, body: Any
) -> None:
    fake.queue_raw(body)
    with pytest.raises(BadRequest):
        client.poll_once()


def test_response_body_size_is_capped(fake: FakePerfect, client: PerfectAPIClient) -> None:
    huge = json.dumps({"run_id": "run-1", "flow_name": "A" * 2_000_000}).encode()
    fake.respond_with("/api/execution-requests", 200, huge, count=1)
    with pytest.raises(BadRequest, match="refused"):
        client.poll_once()
    fake.respond_with("/api/heartbeat", 200, b"[" + b"0," * 600_000 + b"0]", count=1)
    result = client.send_heartbeat()
    assert result.ok and result.body is None and "refused" in result.error


def test_redirects_are_not_followed(fake: FakePerfect, client: PerfectAPIClient) -> None:
    fake.respond_with("/api/heartbeat", 302, b"",
                      headers={"Location": fake.url + "/api/engine/flows"})
    result = client.send_heartbeat()
    assert result.status is ApiStatus.CLIENT_ERROR and "not followed" in result.error
    assert fake.requests_to("/api/engine/flows") == []


def test_token_is_sent_and_never_shown(
    fake: FakePerfect, client: PerfectAPIClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client.send_heartbeat()
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in repr(client) and "***" in repr(client)
    run_id = new_run(client)
    fake.fail_with("/api/flows/", 400, count=1)
    sender = sender_for(client, run_id)
    sender.log("refused line")
    sender.update(0, {"state": "FAILED", "crucialPass": False})
    finish(sender)
    fake.stop()
    client.send_heartbeat()
    assert "refused" in caplog.text and TOKEN not in caplog.text


def test_listen_for_executions_skips_malformed_requests(
    fake: FakePerfect, client: PerfectAPIClient
) -> None:
    stop = threading.Event()
    seen: list[ExecutionRequest] = []

    def handle(request: ExecutionRequest) -> None:
        seen.append(request)
        stop.set()

    fake.queue_raw({"run_id": 1})
    fake.queue_raw({"run_id": "run-2", "flow_name": "B", "configuration": "dev"})
    client.listen_for_executions(handle, stop)
    assert seen == [ExecutionRequest("run-2", "B", "dev")]


# -- sender.py ---------------------------------------------------------------


def test_states_and_logs_arrive_in_enqueue_order(
    fake: FakePerfect, client: PerfectAPIClient
) -> None:
    run_id = new_run(client)
    sender = sender_for(client, run_id, log_rate=5.0)  # slow rate: lines join up
    sender.progress(0, {"taskName": "extract", "progress": 0}, first=True)
    sender.log_lines(["a1", "a2", "a3"])
    sender.update(0, {"state": "COMPLETED", "taskName": "extract", "durationMs": 5})
    sender.progress(1, {"taskName": "load", "progress": 0}, first=True)
    sender.log("b1")
    sender.update(1, {"state": "COMPLETED", "taskName": "load", "durationMs": 5})
    sender.complete(2)
    finish(sender)
    events = describe(run_traffic(fake, run_id))
    lines = [line for e in events if e.startswith("log:") for line in e[4:].split("\n")]
    assert lines == ["a1", "a2", "a3", "b1"]
    assert [e for e in events if not e.startswith("log:")] == [
        "0:RUNNING", "0:COMPLETED", "1:RUNNING", "1:COMPLETED", "complete:2"]
    assert events.index("0:COMPLETED") > max(i for i, e in enumerate(events) if "a3" in e)
    assert events.index("1:RUNNING") > events.index("0:COMPLETED")
    assert fake.run(run_id)["state"] == "COMPLETED"


def test_slow_output_sends_one_entry_per_line(
    fake: FakePerfect, client: PerfectAPIClient
) -> None:
    run_id = new_run(client)
    sender = sender_for(client, run_id)
    for n in range(3):
        sender.log(f"line {n}")
        fake.wait_for(lambda n=n: len(log_entries(fake, run_id)) == n + 1)
    finish(sender)
    assert log_entries(fake, run_id) == ["line 0", "line 1", "line 2"]


def test_flood_is_joined_capped_and_ends_with_kept_locally_entry(
    fake: FakePerfect, client: PerfectAPIClient
) -> None:
    run_id = new_run(client)
    sender = sender_for(client, run_id, max_log_entries=40, log_rate=1000.0)
    sender.log_lines(f"line {n}" for n in range(200_000))
    fake.wait_for(lambda: len(log_entries(fake, run_id)) >= 39, 20)
    sender.complete(0)
    finish(sender, timeout=30)
    entries = log_entries(fake, run_id)
    assert len(entries) <= 40
    assert "kept only locally" in entries[-1] and "/tmp/run.log" in entries[-1]
    assert all(len(e.encode()) <= 16 * 1024 for e in entries)
    assert all(e.startswith("[") for e in entries[1:-1] if not e[0].isdigit())  # "[N lines]"
    numbers = [int(line.split()[1]) for e in entries[:-1] if not e[0].isdigit()
               for line in e.split("\n") if not line.startswith("[")]
    assert numbers == sorted(numbers) and numbers[0] == 0 and len(numbers) > 1000
    total = int(entries[-1].split()[0])
    notices = [e for e in entries[:-1] if e[0].isdigit()]
    assert len(numbers) + total + sum(int(e.split()[0]) for e in notices) >= 200_000
    assert describe(run_traffic(fake, run_id))[-1] == "complete:0"


def test_enqueue_never_waits_on_a_slow_backend(
    fake: FakePerfect, client: PerfectAPIClient
) -> None:
    run_id = new_run(client)
    fake.set_delay("/api/flows/", 0.3)
    sender = sender_for(client, run_id)
    sender.log("first")
    fake.wait_for(lambda: fake.requests_to("/api/flows/*/logs"))  # now in flight, held
    for n in range(10_000):
        sender.log(f"line {n}")
        if n % 10 == 0:
            sender.progress(0, {"taskName": "extract", "progress": n % 99})
    served = [r for r in fake.requests_to("/api/flows/*/logs") if r.status is not None]
    assert served == []  # 11,000 enqueues done before the first 300 ms answer
    fake.set_delay("/api/flows/", 0)
    # A cheap predicate: the fake re-checks it on every request it gets.
    fake.wait_for(lambda: "line 9999" in str(fake.requests[-1].body), 20)
    sender.complete(1)
    finish(sender)
    lines = [line for e in log_entries(fake, run_id) for line in e.split("\n")
             if not line.endswith(" lines]")]
    assert lines == ["first"] + [f"line {n}" for n in range(10_000)]


def test_progress_coalesces_and_is_throttled(fake: FakePerfect, client: PerfectAPIClient) -> None:
    run_id = new_run(client)
    sender = sender_for(client, run_id, progress_interval=0.2)
    fake.set_delay("/api/runs/", 0.1)
    sender.progress(0, {"taskName": "extract", "progress": 0}, first=True)
    deadline = time.monotonic() + 0.8
    n = 0
    while time.monotonic() < deadline:  # a producer ticking every 5 ms, like an executor
        n += 1
        sender.progress(0, {"taskName": "extract", "progress": min(99, n)})
        sender.log(f"tick {n}")
        time.sleep(0.005)
    sender.update(0, {"state": "COMPLETED", "taskName": "extract"})
    finish(sender)
    running = [r for r in fake.requests_to(f"/api/runs/{run_id}/tasks/0/state")
               if r.body["state"] == "RUNNING"]
    assert 2 <= len(running) <= 6
    gaps = [b.time - a.time for a, b in zip(running, running[1:], strict=False)]
    assert all(gap >= 0.19 for gap in gaps), gaps
    assert running[0].body["progress"] <= running[-1].body["progress"]
    assert all(r.body["taskName"] == "extract" for r in running)
    assert describe(run_traffic(fake, run_id))[-1] == "0:COMPLETED"


def test_backend_outage_then_back_loses_nothing(
    fake: FakePerfect, client: PerfectAPIClient
) -> None:
    run_id = new_run(client)
    sender = sender_for(client, run_id)
    fake.fail_with("/api/", 503)
    sender.progress(0, {"taskName": "extract", "progress": 0}, first=True)
    sender.log_lines(["x1", "x2"])
    sender.update(0, {"state": "COMPLETED", "taskName": "extract"})
    sender.log("x3")
    sender.complete(1)
    fake.wait_for(lambda: len(run_traffic(fake, run_id)) >= 3)
    fake.clear_faults()
    finish(sender)
    delivered = [r for r in run_traffic(fake, run_id) if r.status == 200]
    events = describe(delivered)
    assert [e for e in events if not e.startswith("log:")] == [
        "0:RUNNING", "0:COMPLETED", "complete:1"]
    lines = [line for e in events if e.startswith("log:") for line in e[4:].split("\n")]
    assert [line for line in lines if not line.endswith(" lines]")] == ["x1", "x2", "x3"]
    assert fake.run(run_id)["state"] == "COMPLETED"


def test_logs_survive_a_backend_restart(fake: FakePerfect, client: PerfectAPIClient) -> None:
    run_id = new_run(client)
    sender = sender_for(client, run_id)
    fake.stop()
    sender.log_lines(f"l{n}" for n in range(50))
    fake.start()
    finish(sender)
    lines = [line for e in log_entries(fake, run_id) for line in e.split("\n")]
    assert lines == [f"l{n}" for n in range(50)]


def test_overflow_drops_log_lines_but_keeps_states(
    fake: FakePerfect, client: PerfectAPIClient
) -> None:
    run_id = new_run(client)
    sender = sender_for(client, run_id, max_bytes=5 * 65, entry_max_bytes=256)
    fake.fail_with("/api/", 503)
    sender.log_lines(f"{n:04d}" + "x" * 60 for n in range(200))
    sender.update(0, {"state": "COMPLETED", "taskName": "extract"})
    sender.log("after")
    fake.wait_for(lambda: run_traffic(fake, run_id))
    fake.clear_faults()
    fake.wait_for(lambda: any("not delivered" in e for e in log_entries(fake, run_id)), 10)
    sender.complete(1)
    finish(sender)
    events = describe([r for r in run_traffic(fake, run_id) if r.status == 200])
    logs = [e[4:] for e in events if e.startswith("log:")]
    notices = [e for e in logs if "not delivered" in e]
    assert notices and logs[0] == notices[0]  # the oldest lines made room
    assert all(n.split(" ", 1)[1] == "log lines not delivered to the backend (too slow to "
               "keep up); full log at /tmp/run.log" for n in notices)
    delivered = [line for e in logs if e not in notices for line in e.split("\n")
                 if not line.endswith(" lines]")]
    # The newest lines are kept (the end of a task's output is where its errors are).
    assert delivered[-1] == "after" and delivered[-2].startswith("0199")
    assert [line[:4] for line in delivered[:-1]] == sorted(line[:4] for line in delivered[:-1])
    assert "0:COMPLETED" in events and events[-1] == "complete:1"
    counted = sum(int(n.split()[0]) for n in notices)
    assert len(delivered) + counted == 201 == len(delivered) + sender.dropped_lines


def test_5xx_is_retried_until_delivered(fake: FakePerfect, client: PerfectAPIClient) -> None:
    run_id = new_run(client)
    fake.fail_with(f"/api/runs/{run_id}/tasks/0/state", 500, count=3)
    sender = sender_for(client, run_id)
    sender.update(0, {"state": "COMPLETED", "taskName": "extract"})
    finish(sender)
    attempts = fake.requests_to(f"/api/runs/{run_id}/tasks/0/state")
    assert [r.status for r in attempts] == [500, 500, 500, 200]
    assert len({json.dumps(r.body) for r in attempts}) == 1


def test_4xx_is_logged_once_and_not_retried(
    fake: FakePerfect, client: PerfectAPIClient, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = new_run(client)
    fake.fail_with(f"/api/runs/{run_id}/tasks/0/state", 400, count=1)
    sender = sender_for(client, run_id)
    sender.update(0, {"state": "RUNNING", "taskName": "extract"})
    sender.log("goes on")
    finish(sender)
    assert [r.status for r in fake.requests_to(f"/api/runs/{run_id}/tasks/0/state")] == [400]
    assert log_entries(fake, run_id) == ["goes on"]
    warnings = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1 and "injected 400" in warnings[0].getMessage()


def test_404_on_running_task_cancels_the_run(
    fake: FakePerfect, client: PerfectAPIClient
) -> None:
    run_id = new_run(client)
    cancelled: list[str] = []
    sender = sender_for(client, run_id, on_cancel=cancelled.append)
    sender.progress(0, {"taskName": "extract", "progress": 0}, first=True)
    fake.wait_for(lambda: fake.run(run_id)["tasks"][0]["state"] == "RUNNING")
    client.update_task_state(run_id, 0, "FAILED")  # the UI's Stop fails the task and run
    sender.progress(0, {"taskName": "extract", "progress": 50}, first=True)
    fake.wait_for(lambda: cancelled == [run_id])
    before = len(run_traffic(fake, run_id))
    sender.log("after cancel")
    sender.update(0, {"state": "COMPLETED"})
    sender.complete(2)
    finish(sender)
    assert len(run_traffic(fake, run_id)) == before
    assert cancelled == [run_id]


def test_404_on_completed_drops_the_run_and_cancels_it(
    fake: FakePerfect, client: PerfectAPIClient, caplog: pytest.LogCaptureFixture
) -> None:
    cancelled: list[str] = []
    sender = sender_for(client, "run-forgotten", on_cancel=cancelled.append)
    fake.set_delay("/api/runs/", 0.2)
    sender.update(0, {"state": "COMPLETED"})
    sender.log("pending line")
    sender.complete(1)
    finish(sender)
    # At the end of a run the log backlog goes first (one entry), then the states.
    assert describe(run_traffic(fake, "run-forgotten")) == ["log:pending line", "0:COMPLETED"]
    # Nothing more can be reported for a run the backend forgot: it is stopped too.
    assert cancelled == ["run-forgotten"] and "no longer knows this run" in caplog.text


def test_nothing_but_logs_and_complete_after_a_crucial_failure(
    fake: FakePerfect, client: PerfectAPIClient
) -> None:
    run_id = new_run(client)
    sender = sender_for(client, run_id)
    sender.update(0, {"state": "FAILED", "taskName": "extract", "crucialPass": True})
    sender.progress(1, {"taskName": "load"}, first=True)
    sender.update(1, {"state": "COMPLETED"})
    sender.log("traceback line")
    sender.complete(1)
    finish(sender)
    assert describe(run_traffic(fake, run_id)) == [
        "log:traceback line", "0:FAILED", "complete:1"]
    assert fake.run(run_id)["state"] == "FAILED"


def test_invalid_state_is_never_sent(fake: FakePerfect, client: PerfectAPIClient) -> None:
    run_id = new_run(client)
    sender = sender_for(client, run_id)
    sender.update(0, {"progress": 5})
    sender.update(0, {"state": "BOGUS"})
    sender.complete(0)
    finish(sender)
    assert describe(run_traffic(fake, run_id)) == ["complete:0"]
    assert not fake.is_poisoned(run_id)


def test_close_gives_up_after_timeout(
    fake: FakePerfect, client: PerfectAPIClient, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = new_run(client)
    fake.fail_with("/api/", 503)
    sender = sender_for(client, run_id)
    sender.log_lines(["a", "b"])
    sender.update(0, {"state": "COMPLETED"})
    sender.complete(1)
    assert sender.close(0.3) >= 2
    assert sender.join(5)
    assert "not delivered" in caplog.text


# -- backend_listener.py -----------------------------------------------------


def test_listener_reports_a_whole_run(fake: FakePerfect, client: PerfectAPIClient) -> None:
    run_id = new_run(client)
    listener = BackendListener(client, log_rate=10_000.0, progress_interval=0.0)
    run = RunRecord(run_id=run_id, flow_name="Daily Sales ETL", log_path="/tmp/r.log")
    task = TaskRecord(index=0, name="extract", estimated_time=8000)
    run.tasks.append(task)
    listener.run_started(run)
    listener.runner_log(run, "flow started")
    listener.task_output(run, None, "stdout", ["body says hi"])
    listener.task_started(run, task)
    listener.task_output(run, task, "stdout", ["out 1"])
    listener.task_output(run, task, "stderr", ["err 1"])
    task.attempts, task.note = 1, "attempt 1 failed: boom"
    listener.task_retrying(run, task)
    task.progress = 40
    listener.task_progress(run, task)
    task.state, task.note, task.duration_ms = "COMPLETED", "done", 1234
    task.table = [{"metric": "rows", "value": math.nan}]
    listener.task_finished(run, task)
    run.state = "COMPLETED"
    listener.run_finished(run)
    assert listener.close(10) == 0
    traffic = run_traffic(fake, run_id)
    lines = [line for e in describe(traffic) if e.startswith("log:") for line in
             e[4:].split("\n")]
    assert lines == ["[perfect_runner] flow started", "[Flow Output] body says hi",
                     "[Task Output] extract: out 1", "[Task Output][stderr] extract: err 1"]
    states = [r.body for r in traffic if r.path.endswith("/state")]
    assert [s["state"] for s in states] == ["RUNNING", "RETRYING", "RUNNING", "COMPLETED"]
    assert states[0] == {"state": "RUNNING", "taskName": "extract", "estimatedTime": 8000,
                         "crucialPass": True, "progress": 0}
    assert states[1]["result"] == {"passed": False, "note": "attempt 1 failed: boom",
                                   "table": []}
    assert states[3]["durationMs"] == 1234
    assert states[3]["result"] == {"passed": True, "note": "done",
                                   "table": [{"metric": "rows", "value": "NaN"}]}
    assert describe(traffic)[-1] == "complete:1"
    assert fake.run(run_id)["state"] == "COMPLETED"


# -- heartbeat.py ------------------------------------------------------------


def test_heartbeat_beats_at_start_and_periodically(fake: FakePerfect) -> None:
    client = PerfectAPIClient(fake.url)
    beat = Heartbeat(client, interval=0.05).start()
    assert beat.wait_first_beat(5)
    fake.wait_for(lambda: len(fake.requests_to("/api/heartbeat")) >= 4)
    started = time.monotonic()
    beat.stop()
    assert not beat.alive and time.monotonic() - started < 1.0


def test_a_slow_heartbeat_answer_does_not_push_the_next_beat_back(fake: FakePerfect) -> None:
    # Each beat is answered 0.6 s late (as a loaded control process or backend would make
    # it); beats are still sent every 1 s, not every 1.6 s.
    fake.set_delay("/api/heartbeat", 0.6)
    beat = Heartbeat(PerfectAPIClient(fake.url), interval=1.0).start()
    try:
        fake.wait_for(lambda: len(fake.requests_to("/api/heartbeat")) >= 4, 10)
    finally:
        beat.stop()
    arrivals = [r.time for r in fake.requests_to("/api/heartbeat")][:4]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert max(gaps) < 1.4, gaps


def test_heartbeat_stop_is_prompt_with_a_long_interval(fake: FakePerfect) -> None:
    beat = Heartbeat(PerfectAPIClient(fake.url), interval=30.0).start()
    assert beat.wait_first_beat(5)
    started = time.monotonic()
    beat.stop()
    assert not beat.alive and time.monotonic() - started < 1.0


def test_heartbeat_logs_outage_once_and_recovery_once(
    fake: FakePerfect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="perfect_runner.transport")
    beat = Heartbeat(PerfectAPIClient(fake.url), interval=0.02, timeout=(0.5, 0.5)).start()
    assert beat.wait_first_beat(5)
    fake.stop()
    fake.wait_for(lambda: beat.failures >= 3)
    fake.start()
    beats = beat.beats_sent
    fake.wait_for(lambda: beat.beats_sent >= beats + 3)
    beat.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("not answering heartbeats" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1
