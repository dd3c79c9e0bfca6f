"""One owner of process lifetime: the fork server reports a child's exit once its
whole tree is gone, and nothing in the control loop waits without bound.

Real processes; each test runs in both sandbox modes.
"""

from __future__ import annotations

import pytest
from conftest import Recorder, execute_flow, is_gone_in

from perfect_runner.isolation import child_process

MODES = ["namespace", "off"]

CRASH_WITH_DAEMON = '''
@task(crucial_pass=False)
def daemon_then_crash():
    # Its own session, so only the fork server's orphan killing can reach it.
    daemon = subprocess.Popen(["sleep", "331"], start_new_session=True)
    print(f"daemon {daemon.pid} {os.readlink('/proc/self/ns/pid')}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

@flow("crash")
def crash():
    daemon_then_crash()
'''


@pytest.mark.parametrize("mode", MODES)
def test_a_task_is_over_only_once_what_it_left_behind_is_gone(write_flows, mode: str) -> None:
    seen: dict[str, bool] = {}
    daemon: list[tuple[str, int]] = []

    def on_event(kind: str, data) -> None:
        if kind == "task_output" and data[1] == "stdout":
            _, pid, namespace = data[2][0].split()
            daemon.append((namespace, int(pid)))
        if kind == "task_finished":
            seen["gone_when_finished"] = is_gone_in(*daemon[0])

    ran = execute_flow(write_flows(CRASH_WITH_DAEMON), "crash", listener=Recorder(on_event),
                       sandbox=mode)
    assert ran.task("daemon_then_crash").note.startswith("crashed: SIGKILL")
    assert seen == {"gone_when_finished": True}


IDLE = """
@task
def noop():
    pass

@flow("idle")
def idle():
    noop()
"""


@pytest.mark.parametrize("mode", MODES)
def test_a_child_that_stops_reading_its_channel_cannot_hang_the_loop(
        write_flows, monkeypatch, mode: str) -> None:
    """A task process stopped (SIGSTOP) while we send it a RunTask bigger than the
    socket buffer (its setup's environment): the send gives up, the child is done."""
    import os
    import signal

    from perfect_runner.executor.engine import FlowExecutor
    from perfect_runner.isolation.protocol import RunTask
    from perfect_runner.isolation.selector_loop import SelectorLoop
    from perfect_runner.isolation.supervisor import start_task_process

    monkeypatch.setattr(child_process, "SEND_WAIT", 0.5)
    executor = FlowExecutor([str(write_flows(IDLE))], sandbox=mode)
    loop = SelectorLoop()
    try:
        child = start_task_process(executor.launcher, loop, lambda *_: None, 1 << 20)
        os.kill(child.pid, signal.SIGSTOP)
        big_env = {"FILLER": "x" * (3 * 1024 * 1024)}
        request = RunTask(key="k", name="noop", index=0, setup={"env": big_env})
        assert child.send(request) is False
        assert child.protocol_error == "did not read what the runner sent for 0.5 s"
        child.stop()  # SIGKILL reaches a stopped process; the server reports the exit
        assert child.exit is not None and child.exit.signal == signal.SIGKILL
    finally:
        loop.close()
        executor.close()


def test_a_pid_that_is_not_known_is_never_signalled() -> None:
    """A pidfd of a reaped process says pid -1: kill(-1) would signal everything."""
    import os

    from perfect_runner.isolation.oskit import pid_of_pidfd, signal_group, signal_process

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    pidfd = os.pidfd_open(pid)
    os.waitpid(pid, 0)
    try:
        assert pid_of_pidfd(pidfd) == -1
    finally:
        os.close(pidfd)
    # Signal 0 only checks: kill(-1, 0) and killpg(0, 0) would succeed unguarded.
    assert not signal_process(-1, 0) and not signal_group(0, 0) and not signal_group(-1, 0)
