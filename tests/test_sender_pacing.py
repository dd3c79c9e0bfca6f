"""The run sender against a fake backend as slow as the real one: states first, lines
one per entry while the backend keeps up, joined (and saying so) only when it does not."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fake_perfect import FakePerfect, Recorded

from perfect_runner.executor.records import RunRecord
from perfect_runner.transport.api import PerfectAPIClient
from perfect_runner.transport.backend_listener import BackendListener, Unfinished
from perfect_runner.transport.backlog import LogBacklog
from perfect_runner.transport.sender import RunSender

TASKS = [{"name": "extract", "estimatedTime": 8000}, {"name": "load", "estimatedTime": 2000}]


@pytest.fixture
def fake() -> Iterator[FakePerfect]:
    with FakePerfect(poll_hold=0.3) as server:
        yield server


@pytest.fixture
def client(fake: FakePerfect) -> Iterator[PerfectAPIClient]:
    api = PerfectAPIClient(fake.url, connect_timeout=1.0, read_timeout=5.0)
    yield api
    api.close()


def new_run(client: PerfectAPIClient) -> str:
    result = client.register_flow({"name": "Daily Sales ETL", "tasks": TASKS})
    run_id = client.create_run(result.body["flow"]["id"])
    assert run_id
    return run_id


def sender_for(client: PerfectAPIClient, run_id: str, **options: Any) -> RunSender:
    defaults: dict[str, Any] = {"progress_interval": 0.0, "backoff_initial": 0.01,
                                "backoff_max": 0.05}
    return RunSender(client, run_id, log_path="/tmp/run.log", **{**defaults, **options})


def traffic(fake: FakePerfect, run_id: str) -> list[Recorded]:
    return [r for r in fake.requests if f"/{run_id}/" in r.path]


def lines_of(entry: str) -> list[str]:
    parts = entry.split("\n")
    header = re.fullmatch(r"\[(\d+) lines\]", parts[0])
    if header:
        assert int(header.group(1)) == len(parts) - 1
        return parts[1:]
    return parts


def warm_up(sender: RunSender, fake: FakePerfect, run_id: str) -> None:
    """A few deliveries, so the sender has measured how fast this backend answers."""
    for n in range(3):
        sender.log(f"warm-up {n}")
        fake.wait_for(lambda n=n: len(traffic(fake, run_id)) == n + 1)


def test_a_state_overtakes_a_long_backlog_on_a_slow_backend(fake, client) -> None:
    run_id = new_run(client)
    fake.set_cost(extra=0.1)
    sender = sender_for(client, run_id, log_rate=0)
    warm_up(sender, fake, run_id)
    sender.log_lines(f"line {n:05d} " + "x" * 60 for n in range(5000))  # ~30 entries' worth
    queued = time.monotonic()
    sender.update(0, {"state": "COMPLETED", "taskName": "extract"})
    state = fake.wait_for(lambda: [r for r in traffic(fake, run_id) if r.path.endswith("/state")])
    # At most: the entry in flight, state_wait (0.5 s), one more entry, then the state.
    assert state[0].time - queued < 1.2
    sender.complete(1)
    sender.finish()
    assert sender.join(20)
    writes = traffic(fake, run_id)
    logs = [r.body["log"] for r in writes if r.path.endswith("/logs")]
    after = [r for r in writes[writes.index(state[0]):] if r.path.endswith("/logs")]
    assert after, "the backlog went on after the state"
    numbers = [int(m.group(1)) for e in logs for line in lines_of(e)
               if (m := re.match(r"line (\d+)", line))]
    assert numbers == sorted(set(numbers))  # in order, no duplicates
    assert writes[-1].path.endswith("/complete") and fake.run(run_id)["state"] == "COMPLETED"


def test_lines_before_a_state_join_into_one_entry_when_the_backend_is_slow(fake,
                                                                            client) -> None:
    run_id = new_run(client)
    fake.set_cost(extra=0.2)
    sender = sender_for(client, run_id)
    warm_up(sender, fake, run_id)
    sender.log_lines(f"out {n}" for n in range(30))
    sender.update(0, {"state": "COMPLETED", "taskName": "extract"})
    fake.wait_for(lambda: any(r.path.endswith("/state") for r in traffic(fake, run_id)), 5)
    events = [r.body.get("log", r.body.get("state")) for r in traffic(fake, run_id)][3:]
    assert events[-1] == "COMPLETED"
    assert [line for e in events[:-1] for line in lines_of(e)] == [f"out {n}" for n in range(30)]
    assert len(events) <= 3 and events[-2].startswith("[")  # joined, and it says so


def test_a_burst_of_dozens_goes_one_line_per_entry_when_the_backend_keeps_up(fake,
                                                                             client) -> None:
    run_id = new_run(client)
    sender = sender_for(client, run_id)  # the default --log-rate: 20/s after a burst of 50
    warm_up(sender, fake, run_id)
    sender.log_lines(f"burst {n}" for n in range(40))
    sender.update(0, {"state": "COMPLETED", "taskName": "extract"})
    sender.complete(1)
    sender.finish()
    assert sender.join(10)
    events = [r.body.get("log", r.body.get("state", "complete"))
              for r in traffic(fake, run_id)][3:]
    assert events == [f"burst {n}" for n in range(40)] + ["COMPLETED", "complete"]


def test_run_end_turns_the_backlog_into_one_entry_then_the_states(fake, client) -> None:
    run_id = new_run(client)
    fake.set_cost(extra=0.2)
    sender = sender_for(client, run_id)
    warm_up(sender, fake, run_id)
    sender.log_lines(f"row {n:05d} " + "y" * 100 for n in range(3000))
    sender.log_lines(["Traceback (most recent call last):", "ValueError: bad row"])
    sender.update(0, {"state": "FAILED", "taskName": "extract", "crucialPass": True})
    ended = time.monotonic()
    sender.complete(1)
    sender.finish()
    assert sender.join(10)
    writes = traffic(fake, run_id)[3:]
    assert [r.path.rsplit("/", 1)[-1] for r in writes] == ["logs", "state", "complete"]
    entry = writes[0].body["log"]
    first, *tail = entry.split("\n")
    assert re.fullmatch(r"\d+ log lines were not sent to the backend \(it was too slow to keep"
                        r" up when the run ended\); full log at /tmp/run\.log; the last \d+ "
                        r"lines:", first)
    assert tail[-2:] == ["Traceback (most recent call last):", "ValueError: bad row"]
    assert int(first.split()[0]) + len(tail) == 3002
    assert writes[-1].time - ended < 1.5 and fake.run(run_id)["state"] == "FAILED"


def test_flush_names_the_runs_it_could_not_finish_when_the_backend_is_gone(fake,
                                                                           client) -> None:
    run_id = new_run(client)
    listener = BackendListener(client, backoff_initial=0.01, backoff_max=0.05)
    run = RunRecord(run_id=run_id, flow_name="Daily Sales ETL")
    listener.run_started(run)
    listener.runner_log(run, "started")
    fake.wait_for(lambda: traffic(fake, run_id))
    fake.stop()
    listener.run_finished(run)
    started = time.monotonic()
    lost = listener.flush(bound=10.0, stall=0.5)
    assert time.monotonic() - started < 2.0  # nothing delivered for 0.5 s: given up
    assert [(u.run_id, u.flow_name) for u in lost] == [(run_id, "Daily Sales ETL")]
    assert lost[0].left >= 1  # its complete at least


def test_flush_reports_a_run_whose_end_was_never_queued(fake, client) -> None:
    run_id = new_run(client)
    listener = BackendListener(client)
    run = RunRecord(run_id=run_id, flow_name="Daily Sales ETL")
    listener.run_started(run)
    listener.runner_log(run, "started, never finished")
    assert listener.flush(bound=5.0) == [Unfinished(run_id, "Daily Sales ETL", 1)]


def test_a_full_backlog_drops_its_oldest_lines_and_says_so_before_the_next_ones() -> None:
    backlog = LogBacklog(entry_max_bytes=1024)
    dropped = sum(backlog.add(seq, f"line {seq:03d}", cap=100) for seq in range(50))
    assert dropped == 39 and backlog.line_count() == 50  # 11 lines of 8+1 bytes fit in 100
    entry = backlog.take(5, "/tmp/run.log")
    assert entry.text.split("\n") == [
        "39 log lines not delivered to the backend (too slow to keep up); full log at "
        "/tmp/run.log; the next 4 lines:", "line 039", "line 040", "line 041", "line 042"]
    assert entry.lines == 43 and backlog.line_count() == 7
    assert backlog.take(1, "/tmp/run.log").text == "line 043"


def test_a_flood_drops_plain_output_before_stderr_and_runner_lines() -> None:
    backlog = LogBacklog(entry_max_bytes=1024)
    for seq in range(10):
        backlog.add(seq, f"out {seq:03d}", cap=100)
    backlog.add(10, "Traceback: boom", cap=100, keep=True)
    dropped = sum(backlog.add(seq, f"out {seq:03d}", cap=100) for seq in range(11, 60))
    assert dropped > 40
    texts = []
    while backlog:
        texts.append(backlog.take(50, "/tmp/run.log").text)
    shown = "\n".join(texts)
    assert "Traceback: boom" in shown and "out 059" in shown
    # The kept line sits where it was printed: after the plain lines dropped before it.
    assert shown.index("not delivered") < shown.index("Traceback: boom")


def test_a_traceback_in_the_middle_of_a_flood_reaches_the_backend(fake, client) -> None:
    run_id = new_run(client)
    fake.set_cost(extra=0.1)
    sender = sender_for(client, run_id, log_rate=0)
    warm_up(sender, fake, run_id)
    sender.log_lines(f"flood {n:06d} " + "x" * 90 for n in range(30000))
    sender.log_lines(["Traceback (most recent call last):", "KeyError: 'missing'"], keep=True)
    sender.log("Task 'boom' (non-crucial) failed: KeyError: 'missing'")
    sender.log_lines(f"flood {n:06d} " + "x" * 90 for n in range(30000, 90000))
    sender.update(0, {"state": "COMPLETED", "taskName": "extract"})
    sender.complete(1)
    sender.finish()
    assert sender.join(20)
    logs = "\n".join(r.body["log"] for r in traffic(fake, run_id) if r.path.endswith("/logs"))
    assert sender.dropped_lines + sender.collapsed_lines > 10000  # it was a real flood
    for line in ("Traceback (most recent call last):", "KeyError: 'missing'",
                 "Task 'boom' (non-crucial) failed: KeyError: 'missing'", "flood 089999"):
        assert line in logs
    assert fake.run(run_id)["state"] == "COMPLETED"
