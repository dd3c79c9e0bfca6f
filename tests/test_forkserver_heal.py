"""The fork server heals: when it dies, its runs fail saying how, and a new one serves.

Real processes throughout: a task SIGKILLs the fork server (its parent), or
its own flow process; the test SIGKILLs the fork server as the OOM killer
would. The flows module writes the pid of every process that imports it, so
a test can see that the new fork server preloaded the modules again (and
that nothing else imported them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, is_gone, run_cli
from fake_perfect import FakePerfect
from worker_process import start_worker, stop_worker, worker_output

from perfect_runner.isolation.healing import Backoff
from perfect_runner.isolation.protocol import EXIT_BOOTSTRAP

# Healing needs a fork server a task can kill: without the sandbox. Inside it, the
# server is init of its namespace and ignores a task's signals (test_sandbox.py).
OFF = ("--sandbox", "off")

FLOWS = '''
import os
import signal
import time
from pathlib import Path

from perfect_runner import TaskResult, flow, task

MARK = Path({tmp!r})
if (MARK / "break-imports").exists():
    raise RuntimeError("imports broken by the test")
with open(MARK / "imports", "a") as out:
    out.write(f"{{os.getpid()}}\\n")


@task(estimated_time=100)
def quick():
    return TaskResult(passed=True, note=f"server {{os.getppid()}}")


@task(estimated_time=100)
def kill_server():
    os.kill(os.getppid(), signal.SIGKILL)  # the fork server forked us
    time.sleep(30)  # we die with it


@task(estimated_time=100)
def kill_flow(flow_pid):
    os.kill(flow_pid, signal.SIGKILL)
    time.sleep(30)  # stopped: nobody wants this result any more


@task(estimated_time=100)
def hold():
    (MARK / "hold-started").write_text("")
    end = time.monotonic() + 30
    while not (MARK / "release").exists() and time.monotonic() < end:
        time.sleep(0.01)


@flow(name="Fine")
def fine():
    quick()


@flow(name="Kill Server")
def kill_server_flow():
    kill_server()


@flow(name="Kill Flow")
def kill_flow_flow():
    kill_flow(os.getpid())


@flow(name="Hold")
def hold_flow():
    hold()
'''


@pytest.fixture
def module(tmp_path: Path) -> Path:
    path = tmp_path / "heal_flows.py"
    path.write_text(textwrap.dedent(FLOWS.format(tmp=str(tmp_path))))
    return path


def imports(tmp_path: Path) -> list[int]:
    path = tmp_path / "imports"
    return [int(n) for n in path.read_text().split()] if path.exists() else []


def records(tmp_path: Path) -> list[dict]:
    found = [json.loads(p.read_text()) for p in (tmp_path / "reports").glob("*.json")]
    return sorted(found, key=lambda r: r["started_at"] or 0)


def said(record: dict) -> str:
    return " | ".join([record["note"], *(t["note"] for t in record["tasks"])])


# --- local mode -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_local_task_kills_fork_server_then_flow_process_next_runs_work(module, tmp_path):
    result = run_cli(*OFF, "--flows", str(module), "--run", "Kill Server", "--run", "Fine",
                     "--run", "Kill Flow", "--run", "Fine", cwd=tmp_path)
    assert result.code == 1, result.stderr[-2000:]
    killed_server, fine1, killed_flow, fine2 = records(tmp_path)
    first, second = imports(tmp_path)  # a new server imported the modules again

    assert killed_server["state"] == "FAILED"
    assert "the fork server died (killed by SIGKILL)" in said(killed_server)
    assert f"fork server (pid {first}) died (killed by SIGKILL)" in result.stderr
    assert f"new fork server started (pid {second}) with the flows modules preloaded" \
        in result.stderr
    assert fine1["state"] == "COMPLETED"
    assert fine1["tasks"][0]["note"] == f"server {second}"

    assert killed_flow["state"] == "FAILED"
    assert killed_flow["note"] == "flow process killed by SIGKILL before the flow finished"
    # Its task was stopped at once instead of sleeping on for nobody.
    (task,) = killed_flow["tasks"]
    assert (task["state"], task["note"]) == (
        "FAILED", "stopped: the flow process is gone (killed by SIGKILL)")
    assert killed_flow["ended_at"] - killed_flow["started_at"] < 10
    assert fine2["state"] == "COMPLETED"
    assert fine2["tasks"][0]["note"] == f"server {second}"  # no restart for a flow's death


@pytest.mark.timeout(60)
def test_local_fork_server_that_keeps_dying_is_restarted_with_backoff(module, tmp_path):
    result = run_cli(*OFF, "--flows", str(module), "--run", "Kill Server", "--run", "Kill Server",
                     "--run", "Fine", cwd=tmp_path)
    assert result.code == 1, result.stderr[-2000:]
    first, second, fine = records(tmp_path)
    assert [first["state"], second["state"], fine["state"]] == ["FAILED", "FAILED", "COMPLETED"]
    assert "fork server died 2 times in a row; next start in 1 s" in result.stderr
    assert len(imports(tmp_path)) == 3
    assert fine["tasks"][0]["note"] == f"server {imports(tmp_path)[-1]}"


@pytest.mark.timeout(60)
def test_local_spawn_start_method_heals_too(module, tmp_path):
    result = run_cli(*OFF, "--flows", str(module), "--start-method", "spawn",
                     "--run", "Kill Server",
                     "--run", "Fine", cwd=tmp_path)
    assert result.code == 1, result.stderr[-2000:]
    killed, fine = records(tmp_path)
    assert killed["state"] == "FAILED"
    assert "the fork server died (killed by SIGKILL)" in said(killed)
    assert fine["state"] == "COMPLETED"
    assert "new fork server started" in result.stderr


def test_backoff_schedule() -> None:
    # Given a fork server that dies within 30 s of each start
    backoff = Backoff()
    # When it dies again and again, then the waits double up to the cap
    assert [backoff.after_death(uptime=1.0) for _ in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]
    # When one lived 30 s or more, then the next start is at once again
    assert backoff.after_death(uptime=30.0) == 0
    assert backoff.after_death(uptime=0.5) == 1


# --- worker mode ------------------------------------------------------------------


def fork_server(worker: subprocess.Popen) -> psutil.Process:
    (server,) = [p for p in psutil.Process(worker.pid).children()
                 if "isolation.forkserver" in " ".join(p.cmdline())]
    return server


def ended(fake: FakePerfect, run_id: str) -> dict:
    fake.wait_for(lambda: fake.run(run_id)["state"] in ("COMPLETED", "FAILED"), 20)
    return fake.run(run_id)


def backend_notes(run: dict) -> str:
    return " | ".join((t["result"] or {}).get("note", "") for t in run["tasks"])


@pytest.mark.timeout(60)
def test_worker_runs_served_by_a_killed_fork_server_fail_and_a_new_one_serves(module,
                                                                           tmp_path):
    with FakePerfect(poll_hold=1.0) as fake:
        worker = start_worker(fake.url, module, tmp_path, *OFF, "--concurrency", "2")
        try:
            fake.wait_for(lambda: len(fake.flows) == 4, 20)
            old_server = fork_server(worker).pid
            held = fake.trigger("Hold")
            fake.wait_for(lambda: (tmp_path / "hold-started").exists(), 20)
            killer = fake.trigger("Kill Server")  # served by the same fork server
            for run_id in (held, killer):
                run = ended(fake, run_id)
                assert run["state"] == "FAILED"
                assert "fork server died (killed by SIGKILL)" in backend_notes(run), run
            # Both flows are back in the library; the next run works on a new server.
            fake.wait_for(lambda: {"Hold", "Kill Server"} <= {f["name"] for f in fake.flows}, 10)
            run = ended(fake, fake.trigger("Fine"))
            assert run["state"] == "COMPLETED"
            new_server = fork_server(worker).pid
            assert new_server != old_server
            assert run["tasks"][0]["result"]["note"] == f"server {new_server}"
            assert imports(tmp_path) == [old_server, new_server]
            assert f"fork server (pid {old_server}) died (killed by SIGKILL)" \
                in worker_output(tmp_path)
            assert only_the_fork_server_left(worker)
        finally:
            stop_worker(worker)
    assert worker.returncode == 0


@pytest.mark.timeout(60)
def test_worker_task_kills_its_flow_process_run_fails_next_completes(module, tmp_path):
    with FakePerfect(poll_hold=1.0) as fake:
        worker = start_worker(fake.url, module, tmp_path, *OFF)
        try:
            fake.wait_for(lambda: len(fake.flows) == 4, 20)
            server = fork_server(worker).pid
            run = ended(fake, fake.trigger("Kill Flow"))
            assert run["state"] == "FAILED"
            (task,) = run["tasks"]
            assert (task["state"], task["result"]["note"]) == (
                "FAILED", "stopped: the flow process is gone (killed by SIGKILL)")
            fake.wait_for(lambda: any("flow process killed by SIGKILL before the flow finished"
                                      in line for line in fake.logs(run["id"])), 10)
            fake.wait_for(lambda: any(f["name"] == "Kill Flow" for f in fake.flows), 10)
            run = ended(fake, fake.trigger("Fine"))
            assert run["state"] == "COMPLETED"
            assert run["tasks"][0]["result"]["note"] == f"server {server}"  # same server
            assert only_the_fork_server_left(worker)
        finally:
            stop_worker(worker)
    assert worker.returncode == 0


def only_the_fork_server_left(worker: subprocess.Popen) -> bool:
    left = [p for p in psutil.Process(worker.pid).children(recursive=True)
            if not is_gone(p.pid)]
    return [p.pid for p in left] == [fork_server(worker).pid]


@pytest.mark.timeout(60)
def test_worker_stops_polling_while_no_fork_server_runs(module, tmp_path):
    with FakePerfect(poll_hold=1.0) as fake:
        worker = start_worker(fake.url, module, tmp_path, *OFF)
        try:
            fake.wait_for(lambda: len(fake.flows) == 4, 20)
            (tmp_path / "break-imports").write_text("")  # no new server can start
            fork_server(worker).send_signal(signal.SIGKILL)  # as the OOM killer would
            fake.wait_for(lambda: "not polling for work" in worker_output(tmp_path), 10)
            since = time.monotonic()
            # Down for a while: heartbeats go on, polls do not.
            fake.wait_for(lambda: [r for r in fake.requests_to("/api/heartbeat", "POST")
                                   if r.time > since], 5)
            polls = [r for r in fake.requests_to("/api/execution-requests", "GET")
                     if r.time > since]
            assert polls == []
            out = worker_output(tmp_path)
            assert "could not start a new fork server" in out
            assert "imports broken by the test" in out
            assert "next start in 1 s" in out

            (tmp_path / "break-imports").unlink()
            fake.wait_for(lambda: "polling for work again" in worker_output(tmp_path), 15)
            run = ended(fake, fake.trigger("Fine"))
            assert run["state"] == "COMPLETED"
        finally:
            stop_worker(worker)
    assert worker.returncode == 0


# --- a forked child never returns into the fork server's loop ---------------------

SERVER = '''
import socket, sys
from perfect_runner.isolation.forkserver import ForkServer

def start_child(config, out_fd, err_fd, chan_fd):
    if sys.argv[2] == "raise":
        raise RuntimeError("start failed")
    # "return": falls off the end, as a start path with a missing exit would

ForkServer(socket.socket(fileno=int(sys.argv[1])), start_child).serve()
'''


@pytest.mark.timeout(30)
@pytest.mark.parametrize("failure", ["raise", "return"])
def test_forked_child_whose_start_fails_exits_and_server_serves_on(failure: str) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(theirs.fileno()), failure],
                              pass_fds=[theirs.fileno()], cwd=REPO, stderr=subprocess.DEVNULL)
    theirs.close()
    try:
        for _ in range(2):  # the server still answers after a failed start
            status = spawn_and_wait(ours)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOTSTRAP
        assert server.poll() is None
    finally:
        ours.close()
        server.wait(10)


def spawn_and_wait(control: socket.socket) -> int:
    """Ask for one child; its raw exit status, as the fork server reports it."""
    reply, reply_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = [os.open(os.devnull, os.O_WRONLY) for _ in range(3)]
    message = json.dumps({"op": "spawn", "config": {"role": "task"}}).encode()
    socket.send_fds(control, [message], [*fds, reply_child.fileno()])
    for fd in fds:
        os.close(fd)
    reply_child.close()
    reply.settimeout(10)
    with reply:
        data, pidfds, _, _ = socket.recv_fds(reply, 4096, 1)
        assert json.loads(data)["op"] == "spawned"
        for fd in pidfds:
            os.close(fd)
        return json.loads(reply.recv(4096))["status"]
