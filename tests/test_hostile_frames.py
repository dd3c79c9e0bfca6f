"""Children that lie on their channel, and sizes that must mean what they say.

Real task and flow processes write forged frames straight onto their channel
(fd 3 in every child, see child_bootstrap), then block: each must end FAILED
"broke the runner protocol: <what>" at once, with nothing left running, and
the next task or run must work. Size tests push a payload past the old
built-in 64 MiB, a table past the header cap, and threads and forks past
--max-procs (as a throwaway non-root user when the tests run as root).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import execute_flow, module_flows, run_cli
from worker_process import start_worker, stop_worker, worker_output

from perfect_runner.executor.options import RunOptions
from perfect_runner.isolation.protocol import NOTE_MAX

FORGE = '''
import json
import socket
import struct
import threading

from perfect_runner import TaskResult

CHANNEL = 3  # where every child has its channel to the control process


def frame(header, blob=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack(">II", len(raw), len(blob)) + raw + blob


def forge(*frames):
    os.write(CHANNEL, b"".join(frames))


def flood(prefix):
    """A huge length prefix, then a write that blocks: nobody reads that much."""
    chan = socket.socket(fileno=os.dup(CHANNEL))
    chan.sendall(prefix)
    chan.sendall(b"x" * (64 << 20))


def block():
    time.sleep(60)  # the runner must not wait for this


@task
def healthy():
    print("healthy ran", flush=True)
    return TaskResult(passed=True, note="fine")
'''

# task -> (body, what the note must say after "broke the runner protocol: ")
TASK_FORGERIES = {
    "percent_abc": ('forge(frame({"type": "progress", "percent": "abc"}))',
                    "progress.percent must be a number, got str 'abc'"),
    "percent_nan": ('forge(frame(b\'{"type": "progress", "percent": NaN}\'))',
                    "malformed frame header: NaN is not JSON"),
    "table_5": ('forge(frame({"type": "task_returned", "result_type": "int", "table": 5}))',
                "task_returned.table must be a list of JSON objects, got int 5"),
    "peak_rss_lots": ('forge(frame({"type": "task_returned", "result_type": "int", '
                      '"peak_rss": "lots"}))',
                      "task_returned.peak_rss must be an integer, got str 'lots'"),
    "unknown_key": ('forge(frame({"type": "task_unsendable", "note": "n", "evil": 1}))',
                    "task_unsendable frame has unknown keys: list ['evil']"),
    "garbage": ('forge(b"\\x00\\x00\\x00\\x05\\x00\\x00\\x00\\x00garbage bytes")',
                "malformed frame header"),
    "huge_header": ('flood(struct.pack(">II", 0xFFFFFFFF, 0))',
                    "frame header of 4294967295 bytes exceeds 4194304"),
    "huge_payload": ('flood(struct.pack(">II", 20, 0xFFFFFFFF))',
                     "frame payload of 4294967295 bytes exceeds 67108864"),
    "flow_frame": ('forge(frame({"type": "call_task", "key": "k", "name": "n"}))',
                   "a task process may not send call_task frames"),
    "two_finals": ('forge(frame({"type": "task_returned", "result_type": "int"}), '
                   'frame({"type": "task_raised", "exc_type": "E", "message": "m", '
                   '"traceback": "t"}))',
                   "task_raised frame after its final frame"),
    "blob_on_channel": ('forge(frame({"type": "task_returned", "result_type": "int"}, '
                        'pickle.dumps(None)))',
                        "frame payload of 4 bytes on its channel (payloads go on the payload "
                        "channel)"),
    "after_good_frames": ('report_progress(10)\n    forge(b"junk" * 9)',
                          "frame header of 1786080875 bytes exceeds 4194304"),
}

# flow -> (body, the run's note after "flow process broke the runner protocol: ")
FLOW_FORGERIES = {
    "key_is_a_list": ('forge(frame({"type": "call_task", "key": ["a", "b"], "name": "n"}))',
                      "call_task.key must be a string, got list ['a', 'b']"),
    "flow_garbage": ('forge(b"\\x00\\x00\\x00\\x02\\x00\\x00\\x00\\x00{]")',
                     "malformed frame header"),
    "task_frame": ('forge(frame({"type": "progress", "percent": 5}))',
                   "a flow process may not send progress frames"),
    "flow_flood": ('flood(struct.pack(">II", 2, 0xFFFFFFFF))',
                   "frame payload of 4294967295 bytes exceeds 67108864"),
    "call_before_reply": ('call = frame({"type": "call_task", "key": f"{__name__}:healthy", '
                          '"name": "healthy"})\n'
                          '    forge(call, call)',
                          "call_task frame while its task call awaits its reply"),
}


HONEST = '''

@task
def slow_ok():
    (TMP / "slow_ok.started").write_text("")
    time.sleep(0.3)
    return TaskResult(passed=True, note="slow ok")


@flow("call in flight at return")
def call_in_flight():
    threading.Thread(target=slow_ok).start()
    wait_for_file(TMP / "slow_ok.started")  # the body returns while the call is in flight


@task
def sleeper():
    (TMP / "sleeper.started").write_text("")
    time.sleep(60)


@flow("forges while a task runs")
def forges_while_a_task_runs():
    def forger():
        wait_for_file(TMP / "sleeper.started")
        forge(b"\\x00\\x00\\x00\\x01\\x00\\x00\\x00\\x00!")
    threading.Thread(target=forger).start()
    sleeper()


@task
def chatty(n):
    def ping():
        for i in range(100_000):
            report_progress(i % 100)
    threading.Thread(target=ping, daemon=True).start()
    return n


@flow("progress racing the final frame")
def progress_race():
    for n in range(20):
        assert chatty(n) == n
'''


def hostile_source() -> str:
    parts = ["import pickle\n", FORGE, HONEST]
    for name, (body, _) in TASK_FORGERIES.items():
        parts.append(f"\n@task(crucial_pass=False)\ndef {name}():\n    {body}\n    block()\n"
                     f"\n@flow({name!r})\ndef flow_{name}():\n    {name}()\n    healthy()\n")
    for name, (body, _) in FLOW_FORGERIES.items():
        parts.append(f"\n@flow({name!r})\ndef flow_{name}():\n    healthy()\n    {body}\n"
                     "    block()\n")
    return "".join(parts)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return module_flows(tmp_path_factory, "hostile_flows", hostile_source())


@pytest.mark.parametrize("name", list(TASK_FORGERIES))
def test_a_task_that_forges_a_frame_fails_at_once(hostile: Path, name: str) -> None:
    ran = execute_flow(hostile, name)  # also: nothing it started outlives the run
    forger, after = ran.task(name), ran.task("healthy")
    assert forger.state == "FAILED"
    assert forger.note.startswith("broke the runner protocol: ")
    assert TASK_FORGERIES[name][1] in forger.note
    assert forger.duration_ms < 10_000, "the runner waited for the forger instead of ending it"
    assert (after.state, after.note) == ("COMPLETED", "fine")  # the next task works
    assert ran.record.state == "COMPLETED"  # the forger was non-crucial


@pytest.mark.parametrize("name", list(FLOW_FORGERIES))
def test_a_flow_process_that_forges_a_frame_fails_its_run_at_once(hostile: Path,
                                                                   name: str) -> None:
    ran = execute_flow(hostile, name)
    assert ran.record.state == "FAILED"
    assert ran.record.note.startswith("flow process broke the runner protocol: "
                                      + FLOW_FORGERIES[name][1])
    flow_task = ran.task("flow")
    assert (flow_task.state, flow_task.note) == ("FAILED", ran.record.note)
    assert {t.state for t in ran.events.finished() if t.name == "healthy"} == {"COMPLETED"}
    duration = ran.record.ended_at - ran.record.started_at
    assert duration < 10, "the runner waited for the forger instead of ending it"


def test_local_mode_writes_the_report_and_goes_on_to_the_next_run(hostile: Path,
                                                                 tmp_path: Path) -> None:
    result = run_cli("--flows", str(hostile), "--run", "key_is_a_list", "--run",
                     "percent_abc", "--reports-dir", str(tmp_path / "reports"),
                     "--log-dir", str(tmp_path / "logs"), cwd=tmp_path)
    assert result.code == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "key_is_a_list: FAILED" in result.stdout
    assert "percent_abc: COMPLETED" in result.stdout  # the run after the forger works
    (report,) = (tmp_path / "reports").glob("key_is_a_list_*.json")
    record = json.loads(report.read_text(encoding="utf-8"))
    assert record["state"] == "FAILED"
    assert record["tasks"][-1]["note"] == ("flow process broke the runner protocol: "
                                           "call_task.key must be a string, got list ['a', 'b']")
    (report,) = (tmp_path / "reports").glob("percent_abc_*.json")
    tasks = json.loads(report.read_text(encoding="utf-8"))["tasks"]
    assert [(t["name"], t["state"]) for t in tasks] == [("percent_abc", "FAILED"),
                                                         ("healthy", "COMPLETED")]
    assert tasks[0]["note"] == ("broke the runner protocol: progress.percent must be a "
                                "number, got str 'abc'")


def test_a_flow_that_forges_while_its_task_runs_stops_that_task(hostile: Path) -> None:
    ran = execute_flow(hostile, "forges while a task runs")
    assert ran.record.state == "FAILED"
    assert ran.record.note.startswith("flow process broke the runner protocol: malformed")
    task = ran.task("sleeper")
    assert (task.state, task.note) == (
        "FAILED", "cancelled: the flow process broke the runner protocol")
    assert ran.record.ended_at - ran.record.started_at < 10


@pytest.mark.parametrize(("name", "tasks"), [("call in flight at return", 1),
                                           ("progress racing the final frame", 20)])
def test_honest_children_racing_their_final_frame_keep_the_protocol(
        hostile: Path, name: str, tasks: int) -> None:
    ran = execute_flow(hostile, name)
    assert ran.record.state == "COMPLETED", ran.record.note
    assert [t.state for t in ran.record.tasks] == ["COMPLETED"] * tasks


@pytest.mark.timeout(60)
def test_worker_reports_forgers_failed_and_serves_on(fake, hostile: Path, tmp_path: Path) -> None:
    worker = start_worker(fake.url, hostile, tmp_path)
    try:
        fake.wait_for(lambda: len(fake.flows) == len(TASK_FORGERIES) + len(FLOW_FORGERIES) + 3, 15)
        for flow_name in ("percent_abc", "key_is_a_list"):
            run_id = fake.trigger(flow_name)
            fake.wait_for(lambda run_id=run_id: fake.run(run_id)["state"] != "RUNNING"
                          and fake.run(run_id)["state"] != "PENDING", 20)
            run = fake.run(run_id)
            notes = [t["result"]["note"] for t in run["tasks"] if t["state"] == "FAILED"]
            assert len(notes) == 1 and "broke the runner protocol: " in notes[0], run
            # A forger's run is over; the flow is back in the library for the next one.
            fake.wait_for(lambda flow_name=flow_name: any(
                f["name"] == flow_name for f in fake.flows), 10)
        assert fake.run(run_id)["state"] == "FAILED"  # the flow forger fails its run
        assert worker.poll() is None, worker_output(tmp_path)
    finally:
        stop_worker(worker)
    assert "Traceback" not in worker_output(tmp_path)


# --- sizes ----------------------------------------------------------------------------

SIZES = '''
import threading

from perfect_runner import TaskResult

PAYLOAD = (64 << 20) + 4096  # just past the old built-in 64 MiB


@task
def make_payload():
    return b"x" * PAYLOAD


@task
def measure(data):
    return len(data)


@flow("big payload")
def big_payload():
    data = make_payload()  # task -> control -> flow
    size = measure(data)  # flow -> control -> task
    del data
    print(f"measured {size}", flush=True)
    assert size == PAYLOAD


@flow("big arguments")
def big_arguments():
    measure(b"x" * (2 << 20))


@task
def big_table():
    rows = [{"row": i, "name": "a row with some text in it, 40 chars.."} for i in range(100_000)]
    return TaskResult(passed=True, note="all rows", table=rows)


@flow("big table")
def big_table_flow():
    big_table()


@task
def noisy_crash():
    for _ in range(3):
        print("e" * 60_000, file=sys.stderr, flush=True)
    os._exit(3)


@flow("noisy crash")
def noisy_crash_flow():
    from perfect_runner import TaskFailed

    try:
        noisy_crash()
    except TaskFailed as exc:
        print(f"caught TaskFailed of {len(str(exc))} characters", flush=True)


@task
def many_threads():
    threading.stack_size(256 * 1024)
    release = threading.Event()
    threads = [threading.Thread(target=release.wait) for _ in range(500)]
    for thread in threads:
        thread.start()
    release.set()
    for thread in threads:
        thread.join()
    return TaskResult(passed=True, note=f"{len(threads)} threads as uid {os.getuid()}")


@flow("threads")
def threads_flow():
    many_threads()


@task
def fork_loop():
    for _ in range(200):  # self-capped: 200 sleeping children at most
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
    time.sleep(60)


@flow("fork loop")
def fork_loop_flow():
    fork_loop()
'''


@pytest.fixture(scope="module")
def sizes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return module_flows(tmp_path_factory, "size_flows", SIZES)


@pytest.mark.timeout(60)
def test_a_result_cap_above_64_mib_works_on_every_hop(sizes: Path) -> None:
    ran = execute_flow(sizes, "big payload", options=RunOptions(max_result=80 << 20))
    assert [(t.name, t.state) for t in ran.record.tasks] == [
        ("make_payload", "COMPLETED"), ("measure", "COMPLETED")]
    assert f"measured {(64 << 20) + 4096}" in ran.events.lines(None)
    assert ran.record.state == "COMPLETED"


def test_arguments_over_the_cap_fail_the_call_with_size_and_cap(sizes: Path) -> None:
    ran = execute_flow(sizes, "big arguments", options=RunOptions(max_result=1 << 20))
    task = ran.task("measure")
    assert (task.state, task.note) == (
        "FAILED", "arguments of task 'measure' are 2.0 MiB, over the result size cap of 1.0 MiB")
    assert ran.record.state == "FAILED"


def test_a_table_too_big_for_a_header_fails_with_its_size_and_the_cap(sizes: Path) -> None:
    ran = execute_flow(sizes, "big table")
    task = ran.task("big_table")
    assert task.state == "FAILED"
    assert task.note.startswith("result of task 'big_table': its note and table take ")
    assert "MiB as JSON, over the cap of 4.0 MiB for a result summary" in task.note
    assert "could not start" not in task.note


def test_a_long_failure_note_reaches_the_flow_body_cut_to_fit(sizes: Path) -> None:
    ran = execute_flow(sizes, "noisy crash")
    task = ran.task("noisy_crash")
    assert task.state == "FAILED" and len(task.note) > 180_000  # three 60 kB stderr lines
    (caught,) = [line for line in ran.events.lines(None) if line.startswith("caught")]
    prefix = "Task 'noisy_crash' failed: "
    assert caught == f"caught TaskFailed of {len(prefix) + NOTE_MAX} characters"


@pytest.fixture(scope="module")
def task_user() -> Iterator[dict[str, int]]:
    """Options that run tasks as a non-root user: a throwaway one when we are root."""
    if os.geteuid() != 0:
        yield {}
        return
    user = "perfect-test-frames"
    created = subprocess.run(["useradd", "--system", "--no-create-home", user],
                             capture_output=True).returncode == 0
    ids = subprocess.run(["id", "-u", user], capture_output=True, text=True)
    if ids.returncode != 0:
        pytest.skip("cannot create a throwaway user here (no useradd)")
    gid = int(subprocess.run(["id", "-g", user], capture_output=True, text=True).stdout)
    try:
        yield {"task_user": int(ids.stdout), "task_group": gid}
    finally:
        if created:
            subprocess.run(["userdel", user], capture_output=True)


def test_threads_are_not_processes_under_max_procs(sizes: Path,
                                                    task_user: dict[str, int]) -> None:
    ran = execute_flow(sizes, "threads", options=RunOptions(max_procs=10, **task_user))
    task = ran.task("many_threads")
    uid = task_user.get("task_user", os.getuid())
    assert (task.state, task.note) == ("COMPLETED", f"500 threads as uid {uid}")


def test_a_fork_loop_is_still_stopped_as_non_root(sizes: Path,
                                                  task_user: dict[str, int]) -> None:
    ran = execute_flow(sizes, "fork loop",
                       options=RunOptions(max_procs=10, kill_grace=0.5, **task_user))
    task = ran.task("fork_loop")
    assert task.state == "FAILED"
    assert task.note.startswith("killed: process limit exceeded (")
    assert task.note.endswith("processes, --max-procs 10)")


def test_a_result_cap_no_frame_can_carry_is_a_usage_error(sizes: Path, tmp_path: Path) -> None:
    result = run_cli("--flows", str(sizes), "--list", "--max-result-size", "5GiB", cwd=tmp_path)
    assert result.code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "perfect-runner: error: --max-result-size 5GiB: at most 4,294,967,295 bytes (4 GiB - 1), "
        "the biggest payload a frame can carry")
