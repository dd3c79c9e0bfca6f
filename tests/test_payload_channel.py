"""Payloads go straight between the flow and the task process, never through us.

A 100 MB argument and a 100 MB result make a round trip while a test process
reads the control process's peak RSS (VmHWM) from outside. Then real task and
flow processes misbehave on their payload channel (the fd next to their
channel, found in /proc/self/fd): garbage, a size over the cap, nothing at all,
a channel closed halfway, a receipt for a channel they never got. Each ends
its own attempt or run FAILED with a note saying what happened, at once (or at
the flow's timeout, for a flow that never sends), with nothing left running,
and the next task works.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, execute_flow, module_flows

from perfect_runner.executor.options import RunOptions

HOSTILE = '''
import json
import socket
import struct

CHANNEL = 3  # every child's channel to the control process


def frame(header):
    raw = json.dumps(header).encode()
    return struct.pack(">II", len(raw), 0) + raw


def payload_fd():
    """The payload channel: the one socket besides the channel."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > CHANNEL and os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                return fd
        except OSError:
            pass
    raise RuntimeError("no payload channel")


def claim_success(raw):
    """Write `raw` where the result goes, say we returned, and hang."""
    os.write(payload_fd(), raw)
    os.write(CHANNEL, frame({"type": "task_returned", "result_type": "bytes"}))
    time.sleep(60)  # the runner must not wait for this


@task
def healthy():
    return TaskResult(passed=True, note="fine")


@task
def measure(data):
    return len(data)


def drain(sock):
    while sock.recv(1 << 16):
        pass


def call_by_hand(misbehave, receipt=True):
    """A flow body that speaks the protocol itself and misbehaves on the payload channel."""
    chan = socket.socket(fileno=os.dup(CHANNEL))
    chan.sendall(frame({"type": "call_task", "key": f"{__name__}:measure", "name": "measure"}))
    # The channel for this call's first attempt came with the previous reply.
    with socket.socket(fileno=os.dup(payload_fd())) as payload:
        misbehave(payload)
        drain(payload)  # the task's (empty) answer, then its end closes
    if receipt:
        chan.sendall(frame({"type": "payload_received", "attempt": 1, "size": 0}))
    print("reply:", chan.recv(1 << 16)[8:].decode(), flush=True)


def closes_early(payload):
    payload.sendall(struct.pack(">Q", 1000) + b"x" * 10)
    payload.shutdown(socket.SHUT_WR)
'''

# task -> (what it writes on its payload channel, its note)
TASK_CASES = {
    "garbage_result": ('struct.pack(">Q", 7) + b"garbage"',
                       "result of task 'garbage_result' could not be unpickled in the flow "
                       "process: UnpicklingError: "),
    "huge_result": ('struct.pack(">Q", 1 << 40)',
                    "broke the runner protocol: its result did not reach the flow process: "
                    "a payload of 1,099,511,627,776 bytes exceeds the result size cap of 64 MiB"),
    "no_result": ('b""',
                  "broke the runner protocol: its result did not reach the flow process: the "
                  "other side closed the payload channel: channel closed after 0 of 8 bytes "
                  "of payload size"),
    "short_result": ('struct.pack(">Q", 1000) + b"x" * 10',
                     "broke the runner protocol: its result did not reach the flow process: the "
                     "other side closed the payload channel: channel closed after 10 of 1000 "
                     "bytes of payload"),
}

# flow -> (how its body misbehaves, the note of the task it called)
FLOW_CASES = {
    "garbage_args": ('call_by_hand(lambda p: p.sendall(struct.pack(">Q", 7) + b"garbage"))',
                     "arguments of task 'measure' could not be unpickled: UnpicklingError: "),
    "huge_args": ('call_by_hand(lambda p: p.sendall(struct.pack(">Q", 1 << 40)))',
                  "arguments of task 'measure' did not arrive whole: a payload of "
                  "1,099,511,627,776 bytes exceeds the result size cap of 64 MiB"),
    "short_args": ("call_by_hand(closes_early)",
                   "arguments of task 'measure' did not arrive whole: the other side closed "
                   "the payload channel: channel closed after 10 of 1000 bytes of payload"),
}


def hostile_source() -> str:
    parts = [HOSTILE]
    for name, (raw, _) in TASK_CASES.items():
        parts.append(f"\n@task(crucial_pass=False)\ndef {name}():\n    claim_success({raw})\n"
                     f"\n@flow({name!r})\ndef flow_{name}():\n    {name}()\n    healthy()\n")
    for name, (body, _) in FLOW_CASES.items():
        parts.append(f"\n@flow({name!r})\ndef flow_{name}():\n    healthy()\n    {body}\n")
    parts.append('''
@flow("never sends", timeout=2)
def never_sends():
    call_by_hand(lambda payload: None)  # the task waits for arguments that never come


@flow("no receipt", timeout=2)
def no_receipt():
    call_by_hand(lambda payload: payload.sendall(struct.pack(">Q", 7) + b"garbage"),
                 receipt=False)


@task(retries=1)
def lies_then_tells(data):
    counter = TMP / "attempts"
    attempt = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(attempt))
    if attempt == 1:
        claim_success(struct.pack(">Q", 1 << 40))
    return data[::-1]


@flow("retry after a lie")
def retry_after_a_lie():
    data = bytes(range(256)) * 4096  # 1 MiB: streamed, not read whole
    back = lies_then_tells(data)
    print("reversed:", back == data[::-1], flush=True)


def refuse():
    raise ValueError("this value does not unpickle here")


class Fussy:
    def __reduce__(self):
        return (refuse, ())


@task(crucial_pass=False)
def fussy():
    return Fussy()


@flow("fussy result")
def fussy_result():
    print("got", fussy(), flush=True)


@flow("stray receipt")
def stray_receipt():
    healthy()
    os.write(CHANNEL, frame({"type": "payload_received", "attempt": 7}))
    time.sleep(60)
''')
    return "".join(parts)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return module_flows(tmp_path_factory, "payload_flows", hostile_source())


@pytest.mark.parametrize("name", list(TASK_CASES))
def test_a_task_that_lies_on_its_payload_channel_fails_alone(hostile: Path, name: str) -> None:
    ran = execute_flow(hostile, name)  # also: nothing it started outlives the run
    liar, after = ran.task(name), ran.task("healthy")
    assert liar.state == "FAILED"
    assert liar.note.startswith(TASK_CASES[name][1])
    assert liar.duration_ms < 10_000, "the runner waited for the liar instead of ending it"
    assert (after.state, after.note) == ("COMPLETED", "fine")  # the next task works
    assert ran.record.state == "COMPLETED"  # the liar was non-crucial


@pytest.mark.parametrize("name", list(FLOW_CASES))
def test_a_flow_that_lies_on_its_payload_channel_fails_its_call(hostile: Path,
                                                                name: str) -> None:
    ran = execute_flow(hostile, name)
    task = ran.task("measure")
    assert task.state == "FAILED"
    assert task.note.startswith(FLOW_CASES[name][1])
    assert ran.record.state == "FAILED"  # measure is crucial
    (reply,) = [line for line in ran.events.lines(None) if line.startswith("reply:")]
    assert '"action":"fail"' in reply  # the flow body heard of the failure
    assert ran.record.ended_at - ran.record.started_at < 10


@pytest.mark.parametrize("name", ["never sends", "no receipt"])
def test_a_flow_that_goes_silent_on_its_payload_channel_ends_at_its_timeout(
        hostile: Path, name: str) -> None:
    ran = execute_flow(hostile, name)
    assert ran.record.state == "FAILED"
    assert ran.record.note == "flow timed out after 2.0 s"
    assert ran.task("measure").state == "FAILED"
    assert ran.record.ended_at - ran.record.started_at < 10


def test_a_receipt_for_a_channel_never_given_breaks_the_protocol(hostile: Path) -> None:
    ran = execute_flow(hostile, "stray receipt")
    assert ran.record.state == "FAILED"
    assert ran.record.note == ("flow process broke the runner protocol: payload_received frame "
                               "for attempt 7, which has no payload channel awaiting its receipt")
    assert ran.task("healthy").state == "COMPLETED"


def test_a_retry_gets_a_fresh_payload_channel_after_a_lie(hostile: Path) -> None:
    ran = execute_flow(hostile, "retry after a lie")
    (retrying,) = ran.events.of("task_retrying")
    assert retrying.note.startswith("attempt 1 failed: broke the runner protocol: its result "
                                    "did not reach the flow process: a payload of ")
    task = ran.task("lies_then_tells")
    assert (task.state, task.attempts) == ("COMPLETED", 2)
    assert "reversed: True" in ran.events.lines(None)
    assert ran.record.state == "COMPLETED"


def test_a_value_the_flow_cannot_unpickle_fails_its_task(hostile: Path) -> None:
    ran = execute_flow(hostile, "fussy result")
    task = ran.task("fussy")
    assert (task.state, task.note) == (
        "FAILED", "result of task 'fussy' could not be unpickled in the flow process: "
                  "ValueError: this value does not unpickle here")
    assert "got None" in ran.events.lines(None)  # non-crucial: the call returns None
    assert ran.record.state == "COMPLETED"


def test_a_lie_under_a_smaller_cap_names_that_cap(hostile: Path) -> None:
    ran = execute_flow(hostile, "huge_result", options=RunOptions(max_result=1 << 20))
    assert ran.task("huge_result").note.endswith("exceeds the result size cap of 1.0 MiB")


# --- 100 MB each way, the control process watched from outside ---------------------

MB100 = 100 * 1000 * 1000

ROUND_TRIP = f'''
@task
def echo(data):
    return data


@flow("round trip")
def round_trip():
    echo(b"warm-up")  # the control process's first task call costs what it costs
    (TMP / "before").write_text("")
    wait_for_file(TMP / "measured")
    data = echo(b"x" * {MB100})
    print("echoed", len(data), data == b"x" * {MB100}, flush=True)
    del data
    (TMP / "after").write_text("")
    wait_for_file(TMP / "done")
'''


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def wait_for(path: Path, proc: subprocess.Popen, limit: float = 30.0) -> None:
    end = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, f"the runner exited with {proc.returncode}"
        assert time.monotonic() < end, f"{path.name} never appeared"
        time.sleep(0.01)


@pytest.mark.timeout(60)
def test_100_mb_each_way_does_not_pass_through_the_control_process(write_flows,
                                                                   tmp_path: Path) -> None:
    flows = write_flows(ROUND_TRIP)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "perfect_runner", "--flows", str(flows), "--run", "round trip",
         "--max-result-size", "128MiB", "--reports-dir", str(tmp_path / "reports"),
         "--log-dir", str(tmp_path / "logs")],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(tmp_path / "before", proc)
        before = peak_rss(proc.pid)
        rss_before = psutil.Process(proc.pid).memory_info().rss
        (tmp_path / "measured").write_text("")
        wait_for(tmp_path / "after", proc)
        after = peak_rss(proc.pid)
        (tmp_path / "done").write_text("")
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert f"echoed {MB100} True" in output
    growth = after - before
    assert growth <= 10 << 20, (f"the control process's peak RSS grew by "
                                f"{growth / 2**20:.1f} MiB (from {before / 2**20:.1f} MiB; "
                                f"RSS {rss_before / 2**20:.1f})")
