"""The fake backend behaves as perfect-api.md says, quirks included (plain HTTP)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from fake_perfect import FakePerfect

TASKS = [
    {"name": "extract", "estimatedTime": 8000, "crucialPass": True},
    {"name": "clean", "estimatedTime": 0},
    {"name": "load", "crucialPass": False},
]


@pytest.fixture
def fake() -> Iterator[FakePerfect]:
    with FakePerfect(poll_hold=0.5, watchdog_timeout=0.6, watchdog_period=0.05) as server:
        yield server


def post(fake: FakePerfect, path: str, body: Any = None) -> requests.Response:
    return requests.post(fake.url + path, json=body, timeout=5)


def get(fake: FakePerfect, path: str) -> requests.Response:
    return requests.get(fake.url + path, timeout=5)


def register(fake: FakePerfect, name: str = "Daily Sales ETL", tasks: Any = None) -> str:
    answer = post(fake, "/api/flows", {"name": name, "tasks": TASKS if tasks is None else tasks})
    assert answer.status_code == 200
    return answer.json()["flow"]["id"]


def client_run(fake: FakePerfect, name: str = "Daily Sales ETL", tasks: Any = None) -> str:
    flow_id = register(fake, name, tasks)
    return post(fake, f"/api/engine/run/{flow_id}", {"configuration": "dev"}).json()["runId"]


def state(fake: FakePerfect, run_id: str, index: int, body: Any) -> requests.Response:
    return post(fake, f"/api/runs/{run_id}/tasks/{index}/state", body)


# -- registration ------------------------------------------------------------


def test_every_registration_creates_a_new_entry_with_default_estimates(fake: FakePerfect) -> None:
    first, second = register(fake), register(fake)
    assert first != second
    library = get(fake, "/api/engine/flows").json()
    assert [f["id"] for f in library] == [first, second]
    assert [t["estimatedTime"] for t in library[0]["tasks"]] == [8000, 1000, 1000]
    assert [t["crucialPass"] for t in library[0]["tasks"]] == [True, True, False]


def test_registration_without_tasks_is_400(fake: FakePerfect) -> None:
    answer = post(fake, "/api/flows", {"name": "x"})
    assert answer.status_code == 400
    assert answer.json()["success"] is False
    assert fake.flows == []


def test_estimate_becomes_the_measured_average_after_two_runs(fake: FakePerfect) -> None:
    for duration in (2000, 4000):
        run_id = client_run(fake, "Stats", [{"name": "a", "estimatedTime": 9000}])
        state(fake, run_id, 0, {"state": "RUNNING"})
        state(fake, run_id, 0, {"state": "COMPLETED", "durationMs": duration})
        post(fake, f"/api/runs/{run_id}/complete", {"taskCount": 1})
    register(fake, "Stats", [{"name": "a", "estimatedTime": 9000}])
    assert fake.flows[-1]["tasks"][0]["estimatedTime"] == 3000


def test_auto_trigger_queues_a_run_at_once(fake: FakePerfect) -> None:
    post(fake, "/api/flows", {"name": "Auto", "tasks": TASKS, "autoTrigger": True,
                              "autoTriggerConfig": "production"})
    request = get(fake, "/api/execution-requests").json()
    assert request["flow_name"] == "Auto" and request["configuration"] == "production"
    assert fake.flows == []


# -- starting runs -----------------------------------------------------------


def test_trigger_creates_pending_run_consumes_entry_and_queues_request(fake: FakePerfect) -> None:
    flow_id = register(fake)
    answer = post(fake, f"/api/engine/trigger/{flow_id}", {"configuration": "production"})
    run_id = answer.json()["runId"]
    run = fake.run(run_id)
    assert run["state"] == "RUNNING"
    assert [(t["taskName"], t["state"]) for t in run["tasks"]] == [
        ("extract", "PENDING"), ("clean", "PENDING"), ("load", "PENDING")]
    assert fake.flows == []
    assert get(fake, "/api/execution-requests").json() == {
        "run_id": run_id, "flow_name": "Daily Sales ETL", "configuration": "production"}
    again = post(fake, f"/api/engine/trigger/{flow_id}", {})  # consumed: no run, no error
    assert again.status_code == 200 and again.json() == {"success": True}
    unknown = post(fake, "/api/engine/trigger/flow-nope", {})
    assert unknown.status_code == 200 and unknown.json() == {"success": True}
    assert fake.queued == 0


def test_client_run_queues_nothing_and_unknown_flow_has_no_run_id(fake: FakePerfect) -> None:
    flow_id = register(fake)
    first = post(fake, f"/api/engine/run/{flow_id}", {"configuration": "dev"})
    assert first.status_code == 200 and first.json()["runId"].startswith("run-")
    assert fake.queued == 0
    again = post(fake, f"/api/engine/run/{flow_id}", {"configuration": "dev"})
    assert again.status_code == 200 and again.json() == {"success": True}


def test_run_uses_task_list_learned_from_earlier_runs(fake: FakePerfect) -> None:
    run_id = client_run(fake, "Learn", [{"name": "a"}])
    state(fake, run_id, 0, {"state": "COMPLETED", "durationMs": 5})
    state(fake, run_id, 1, {"state": "COMPLETED", "taskName": "b", "durationMs": 5})
    post(fake, f"/api/runs/{run_id}/complete", {"taskCount": 2})
    second = client_run(fake, "Learn", [])
    assert [t["taskName"] for t in fake.run(second)["tasks"]] == ["a", "b"]
    # the learned list wins over the registered one, and run tasks carry no crucialPass
    third = client_run(fake, "Learn", [{"name": "x", "crucialPass": False}])
    tasks = fake.run(third)["tasks"]
    assert [(t["taskName"], t["crucialPass"]) for t in tasks] == [("a", None), ("b", None)]


# -- long poll ---------------------------------------------------------------


def test_empty_poll_is_held_then_answers_null_and_counts_as_heartbeat(fake: FakePerfect) -> None:
    assert fake.last_heartbeat is None
    answer = get(fake, "/api/execution-requests")
    assert answer.status_code == 200 and answer.text == "null"
    assert fake.last_heartbeat is not None
    assert fake.requests[-1].status == 200


def test_queue_is_fifo(fake: FakePerfect) -> None:
    first = fake.trigger(register(fake, "A"))
    second = fake.trigger(register(fake, "B"))
    assert get(fake, "/api/execution-requests").json()["run_id"] == first
    assert get(fake, "/api/execution-requests").json()["run_id"] == second


def test_request_goes_to_oldest_waiting_poller_once(fake: FakePerfect) -> None:
    fake.poll_hold = 5.0
    results: dict[str, Any] = {}

    def poll(name: str) -> None:
        results[name] = get(fake, "/api/execution-requests").json()

    old = threading.Thread(target=poll, args=("old",))
    old.start()
    fake.wait_for(lambda: fake.waiting_pollers == 1)
    new = threading.Thread(target=poll, args=("new",))
    new.start()
    fake.wait_for(lambda: fake.waiting_pollers == 2)
    first = fake.trigger(register(fake, "A"))
    old.join(5)
    assert results == {"old": {"run_id": first, "flow_name": "A", "configuration": "development"}}
    second = fake.trigger(register(fake, "B"))
    new.join(5)
    assert results["new"]["run_id"] == second
    assert fake.queued == 0


def test_disconnected_poller_is_dropped_from_wait_list(fake: FakePerfect) -> None:
    fake.poll_hold = 5.0
    sock = socket.create_connection(("127.0.0.1", fake.port))
    sock.sendall(b"GET /api/execution-requests HTTP/1.1\r\nHost: x\r\n\r\n")
    fake.wait_for(lambda: fake.waiting_pollers == 1)
    sock.close()
    fake.wait_for(lambda: fake.waiting_pollers == 0)
    run_id = fake.trigger(register(fake))
    assert fake.queued == 1
    assert get(fake, "/api/execution-requests").json()["run_id"] == run_id


# -- state updates -----------------------------------------------------------


def test_running_progress_is_computed_by_the_server(fake: FakePerfect) -> None:
    run_id = client_run(fake)
    assert state(fake, run_id, 0, {"state": "running", "progress": 77}).json() == {
        "success": True}
    task = fake.run(run_id)["tasks"][0]
    assert task["state"] == "RUNNING" and task["progress"] < 5 and task["startTime"]


def test_dynamic_task_and_rename(fake: FakePerfect) -> None:
    run_id = client_run(fake)
    assert state(fake, run_id, 3, {"state": "RUNNING", "taskName": "extra"}).status_code == 200
    assert state(fake, run_id, 0, {"state": "RUNNING", "taskName": "renamed"}).status_code == 200
    names = [t["taskName"] for t in fake.run(run_id)["tasks"]]
    assert names == ["renamed", "clean", "load", "extra"]
    assert not fake.is_sparse(run_id)
    assert state(fake, run_id, 9, {"state": "RUNNING", "taskName": "far"}).status_code == 400
    assert fake.is_sparse(run_id) and fake.is_poisoned(run_id)  # duplicate task rows
    assert post(fake, f"/api/runs/{run_id}/complete", {"taskCount": 10}).json() == {
        "success": False, "error": "UNIQUE constraint failed: task_runs.id"}


def test_odd_indexes_are_accepted_and_change_nothing(fake: FakePerfect) -> None:
    run_id = client_run(fake)
    for index in ("abc", "-1"):
        answer = post(fake, f"/api/runs/{run_id}/tasks/{index}/state", {"state": "RUNNING"})
        assert answer.status_code == 200
    assert [t["state"] for t in fake.run(run_id)["tasks"]] == ["PENDING"] * 3


def test_404_on_a_finished_task_still_renames_it(fake: FakePerfect) -> None:
    run_id = client_run(fake)
    state(fake, run_id, 0, {"state": "COMPLETED"})
    assert state(fake, run_id, 0, {"state": "RUNNING", "taskName": "other"}).status_code == 404
    assert fake.run(run_id)["tasks"][0]["taskName"] == "other"


def test_404_for_unknown_run_and_for_finished_task(fake: FakePerfect) -> None:
    assert state(fake, "run-nope", 0, {"state": "RUNNING"}).status_code == 404
    run_id = client_run(fake)
    state(fake, run_id, 0, {"state": "COMPLETED", "durationMs": 10})
    answer = state(fake, run_id, 0, {"state": "RUNNING"})
    assert answer.status_code == 404
    assert answer.json() == {"success": False, "error": "Run or task not found"}
    task = fake.run(run_id)["tasks"][0]
    assert task["progress"] == 100 and task["durationMs"] == 10


def test_update_without_state_poisons_the_run_until_that_task_gets_a_state(
    fake: FakePerfect,
) -> None:
    run_id = client_run(fake)
    refused = {"success": False, "error": "NOT NULL constraint failed: task_runs.state"}
    assert state(fake, run_id, 0, {"progress": 3}).json() == refused
    assert fake.is_poisoned(run_id)
    assert state(fake, run_id, 1, {"state": "RUNNING"}).status_code == 400
    assert post(fake, f"/api/flows/{run_id}/logs", {"log": "x"}).status_code == 400
    assert post(fake, f"/api/runs/{run_id}/complete", {"taskCount": 1}).status_code == 400
    assert fake.logs(run_id) == ["x"]  # refused with 400, yet kept in memory
    assert state(fake, run_id, 0, {"state": "RUNNING"}).status_code == 200  # healed
    assert not fake.is_poisoned(run_id)


def test_log_without_log_poisons_the_run_for_good(fake: FakePerfect) -> None:
    run_id = client_run(fake)
    refused = {"success": False, "error": "NOT NULL constraint failed: logs.log_entry"}
    assert post(fake, f"/api/flows/{run_id}/logs", {}).json() == refused
    assert state(fake, run_id, 0, {"state": "RUNNING"}).json() == refused
    assert post(fake, f"/api/flows/{run_id}/logs", {"log": "ok"}).json() == refused
    assert fake.is_poisoned(run_id)


def test_nan_body_is_refused_without_poisoning(fake: FakePerfect) -> None:
    run_id = client_run(fake)
    answer = requests.post(
        f"{fake.url}/api/runs/{run_id}/tasks/0/state",
        data=b'{"state": "RUNNING", "progress": NaN}',
        headers={"Content-Type": "application/json"}, timeout=5)
    assert answer.status_code == 400
    assert not fake.is_poisoned(run_id)


def test_crucial_failure_fails_run_at_once_but_pending_tasks_still_accept(
    fake: FakePerfect,
) -> None:
    run_id = client_run(fake)
    state(fake, run_id, 0, {"state": "RUNNING"})
    state(fake, run_id, 0, {"state": "FAILED", "result": {"passed": False, "note": "boom"}})
    run = fake.run(run_id)
    assert run["state"] == "FAILED" and run["reportPath"]
    assert get(fake, f"/api/reports/run/{run_id}").status_code == 200
    assert state(fake, run_id, 1, {"state": "RUNNING"}).status_code == 200
    assert state(fake, run_id, 3, {"state": "RUNNING", "taskName": "zombie"}).status_code == 200


def test_non_crucial_failure_keeps_run_running(fake: FakePerfect) -> None:
    run_id = client_run(fake)
    state(fake, run_id, 2, {"state": "FAILED", "crucialPass": False})
    assert fake.run(run_id)["state"] == "RUNNING"


# -- logs --------------------------------------------------------------------


def test_logs_for_unknown_runs_are_accepted_and_finished_runs_still_append(
    fake: FakePerfect,
) -> None:
    assert post(fake, "/api/flows/run-ghost/logs", {"log": "lost"}).json() == {"success": True}
    run_id = client_run(fake, tasks=[])
    post(fake, f"/api/runs/{run_id}/complete", {"taskCount": 0})
    post(fake, f"/api/flows/{run_id}/logs", {"log": "late line"})
    assert fake.run(run_id)["state"] == "COMPLETED"
    assert fake.logs(run_id) == ["late line"]


# -- complete ----------------------------------------------------------------


def test_complete_drops_planned_tasks_past_n(fake: FakePerfect) -> None:
    run_id = client_run(fake)
    state(fake, run_id, 0, {"state": "COMPLETED", "durationMs": 1})
    assert post(fake, f"/api/runs/{run_id}/complete", {"taskCount": 1}).status_code == 200
    run = fake.run(run_id)
    assert run["state"] == "COMPLETED" and run["progress"] == 100 and len(run["tasks"]) == 1
    assert get(fake, f"/api/reports/run/{run_id}").json()["report"]["url"].startswith(
        "/Reports/Daily_Sales_ETL/")


def test_complete_with_unfinished_task_leaves_run_running(fake: FakePerfect) -> None:
    run_id = client_run(fake)
    state(fake, run_id, 0, {"state": "COMPLETED"})
    assert post(fake, f"/api/runs/{run_id}/complete", {"taskCount": 2}).status_code == 200
    assert fake.run(run_id)["state"] == "RUNNING"
    assert get(fake, f"/api/reports/run/{run_id}").status_code == 404


def test_complete_zero_unknown_and_failed(fake: FakePerfect) -> None:
    run_id = client_run(fake)
    post(fake, f"/api/runs/{run_id}/complete", {"taskCount": 0})
    assert fake.run(run_id)["state"] == "COMPLETED" and fake.run(run_id)["tasks"] == []
    assert post(fake, "/api/runs/run-nope/complete", {"taskCount": 0}).status_code == 404
    failed = client_run(fake)
    state(fake, failed, 0, {"state": "FAILED"})
    assert post(fake, f"/api/runs/{failed}/complete", {"taskCount": 1}).status_code == 200
    assert fake.run(failed)["state"] == "FAILED"
    assert len(fake.run(failed)["tasks"]) == 1  # truncated all the same


def test_complete_turns_a_stopped_run_completed_when_no_crucial_task_failed(
    fake: FakePerfect,
) -> None:
    run_id = client_run(fake, tasks=[{"name": "a"}, {"name": "b"}])
    state(fake, run_id, 0, {"state": "RUNNING", "crucialPass": False})
    post(fake, "/api/client/stop", {})
    assert fake.run(run_id)["state"] == "FAILED"
    post(fake, f"/api/runs/{run_id}/complete", {"taskCount": 1})
    assert fake.run(run_id)["state"] == "COMPLETED"


def test_complete_with_failed_crucial_task_fails_the_run(fake: FakePerfect) -> None:
    run_id = client_run(fake, tasks=[{"name": "a", "crucialPass": False}])
    state(fake, run_id, 0, {"state": "FAILED", "crucialPass": False})
    post(fake, f"/api/runs/{run_id}/complete", {"taskCount": 1})
    assert fake.run(run_id)["state"] == "COMPLETED"
    other = client_run(fake, "Other", [{"name": "a"}])
    with fake._cond:  # a crucial FAILED recorded while the run was kept RUNNING
        fake._runs[other]["tasks"][0].update(state="FAILED", crucialPass=True)
    post(fake, f"/api/runs/{other}/complete", {"taskCount": 1})
    assert fake.run(other)["state"] == "FAILED"


# -- heartbeat watchdog ------------------------------------------------------


def test_watchdog_fails_running_runs_and_forgets_the_timestamp(fake: FakePerfect) -> None:
    run_id = client_run(fake)
    state(fake, run_id, 0, {"state": "RUNNING"})
    post(fake, "/api/heartbeat")
    fake.wait_for(lambda: fake.run(run_id)["state"] == "FAILED", timeout=5)
    run = fake.run(run_id)
    assert [t["state"] for t in run["tasks"]] == ["FAILED"] * 3
    assert run["logs"][-1] == "[System] Flow failed: Lost connection to Python client"
    assert run["tasks"][1]["logs"] == ["[System] Task failed: Lost connection to Python client"]
    assert fake.last_heartbeat is None
    assert run["reportPath"] is None  # the watchdog writes the file but never links it
    assert get(fake, f"/api/reports/run/{run_id}").json() == {
        "success": False, "error": "No report exists for this run"}


def test_no_heartbeat_ever_means_no_watchdog(fake: FakePerfect) -> None:
    run_id = client_run(fake)
    with pytest.raises(TimeoutError):  # the watchdog runs every 50 ms: give it 20 chances
        fake.wait_for(lambda: fake.run(run_id)["state"] != "RUNNING", timeout=1.0)


def test_stale_timestamp_fails_the_next_run_unless_a_heartbeat_comes_first(
    fake: FakePerfect,
) -> None:
    post(fake, "/api/heartbeat")
    fake.wait_for(lambda: time.monotonic() - fake.last_heartbeat > 1.0, timeout=3)
    assert fake.last_heartbeat is not None  # nothing ran: the stale time stays
    doomed = client_run(fake)
    fake.wait_for(lambda: fake.run(doomed)["state"] == "FAILED", timeout=3)
    post(fake, "/api/heartbeat")
    saved = client_run(fake, "Saved")
    state(fake, saved, 0, {"state": "RUNNING"})
    assert fake.run(saved)["state"] == "RUNNING"


@pytest.mark.parametrize("poison", ["state", "log"])
def test_watchdog_on_a_poisoned_run_crashes_the_server(fake: FakePerfect, poison: str) -> None:
    run_id = client_run(fake)
    if poison == "state":
        state(fake, run_id, 0, {})
    else:
        post(fake, f"/api/flows/{run_id}/logs", {})
    post(fake, "/api/heartbeat")
    fake.wait_for(lambda: fake.crashed, timeout=5)
    with pytest.raises(requests.ConnectionError):
        get(fake, "/api/engine/runs")


# -- read side ---------------------------------------------------------------


def test_runs_newest_first_reports_and_delete(fake: FakePerfect) -> None:
    older, newer = client_run(fake, "A"), client_run(fake, "B")
    assert [r["id"] for r in get(fake, "/api/engine/runs").json()] == [newer, older]
    assert get(fake, f"/api/reports/run/{older}").json() == {
        "success": False, "error": "No report exists for this run"}
    assert get(fake, "/api/reports/run/run-nope").json() == {
        "success": False, "error": "Run not found"}
    running = requests.delete(f"{fake.url}/api/runs/{older}", timeout=5)
    assert running.status_code == 404
    assert running.json() == {"success": False, "error": "Run not found or is currently running"}
    post(fake, f"/api/runs/{older}/complete", {"taskCount": 0})
    report = get(fake, f"/api/reports/run/{older}").json()["report"]
    assert "<html>" in get(fake, report["url"]).text
    flow_reports = get(fake, "/api/reports/flow/A").json()
    assert flow_reports["flowName"] == "A" and len(flow_reports["reports"]) == 1
    assert requests.delete(f"{fake.url}/api/runs/{older}", timeout=5).status_code == 200
    assert requests.delete(f"{fake.url}/api/runs/{older}", timeout=5).status_code == 404
    assert list(fake.runs) == [newer]


def test_ui_stop_fails_running_runs_but_only_their_running_tasks(fake: FakePerfect) -> None:
    run_id = client_run(fake)
    state(fake, run_id, 0, {"state": "RUNNING"})
    answer = post(fake, "/api/client/stop", {})
    assert answer.json() == {"success": True, "message": "Client already stopped",
                             "status": "stopped"}
    run = fake.run(run_id)
    assert run["state"] == "FAILED" and run["reportPath"]
    assert [t["state"] for t in run["tasks"]] == ["FAILED", "PENDING", "PENDING"]
    assert run["logs"] == ["[System] Flow failed: User stopped the client"]
    assert state(fake, run_id, 0, {"state": "RUNNING"}).status_code == 404


def test_bad_json_is_express_default_html_400(fake: FakePerfect) -> None:
    answer = requests.post(f"{fake.url}/api/flows", data=b"{bad",
                           headers={"Content-Type": "application/json"}, timeout=5)
    assert answer.status_code == 400
    assert answer.headers["Content-Type"].startswith("text/html")


# -- test controls -----------------------------------------------------------


def test_restart_on_same_port_keeps_runs_fails_running_and_loses_queue(
    fake: FakePerfect,
) -> None:
    port = fake.port
    done = client_run(fake, "Done", [])
    post(fake, f"/api/runs/{done}/complete", {"taskCount": 0})
    queued = fake.trigger(register(fake))
    fake.stop()
    with pytest.raises(requests.ConnectionError):
        get(fake, "/api/engine/runs")
    fake.start()
    assert fake.port == port
    assert fake.run(done)["state"] == "COMPLETED"
    assert fake.run(queued)["state"] == "FAILED"
    assert get(fake, "/api/execution-requests").text == "null"


def test_fault_injection_counts_and_records(fake: FakePerfect) -> None:
    fake.fail_with("/api/heartbeat", 500, count=2)
    codes = [post(fake, "/api/heartbeat").status_code for _ in range(3)]
    assert codes == [500, 500, 200]
    assert [r.status for r in fake.requests_to("/api/heartbeat")] == [500, 500, 200]
    fake.respond_with("/api/runs/*/complete", 302, b"", headers={"Location": "/elsewhere"})
    answer = requests.post(f"{fake.url}/api/runs/x/complete", json={}, timeout=5,
                           allow_redirects=False)
    assert answer.status_code == 302 and answer.headers["Location"] == "/elsewhere"


def test_delay_holds_only_matching_requests(fake: FakePerfect) -> None:
    fake.set_delay("/api/flows/", 0.3)
    started = time.monotonic()
    post(fake, "/api/heartbeat")
    fast = time.monotonic() - started
    post(fake, "/api/flows/run-x/logs", {"log": "slow"})
    slow = time.monotonic() - started - fast
    assert fast < 0.3 <= slow
    body = fake.requests_to("/api/flows/*/logs")[0].body
    assert body == {"log": "slow"}


def test_run_writes_cost_more_as_the_run_grows_and_are_served_one_at_a_time(
    fake: FakePerfect,
) -> None:
    run_id = client_run(fake)
    fake.set_cost(extra=0.05, per_mb=0.4)
    post(fake, f"/api/flows/{run_id}/logs", {"log": "x" * 2**20})  # the run is now ~1 MB
    started = time.monotonic()
    threads = [threading.Thread(target=post, args=(fake, path, body)) for path, body in [
        (f"/api/flows/{run_id}/logs", {"log": "a"}),
        (f"/api/runs/{run_id}/tasks/0/state", {"state": "RUNNING"}),
        (f"/api/runs/{run_id}/complete", {"taskCount": 3}),
    ]]
    for thread in threads:
        thread.start()
    post(fake, "/api/heartbeat")  # not a run write: no cost, not queued behind them
    heartbeat_at = time.monotonic() - started
    for thread in threads:
        thread.join(5)
    elapsed = time.monotonic() - started
    writes = [r for r in fake.requests if run_id in r.path][-3:]
    assert all(0.44 <= r.cost <= 0.47 for r in writes), [r.cost for r in writes]
    assert elapsed >= 3 * 0.44 and heartbeat_at < 0.3  # one write at a time
    assert fake.requests_to("/api/heartbeat")[0].cost == 0
