"""Secrets stay in the control process: tasks never see the worker's token."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import host_pid
from fake_perfect import FakePerfect

TOKEN = "tok-3f9a2c-never-leak"

FLOWS = textwrap.dedent('''
    import json, os
    from pathlib import Path
    from perfect_runner import task, flow, TaskResult

    def ancestors():
        """Each ancestor's pid and what its /proc/<pid>/environ shows us."""
        found, pid = [], os.getpid()
        while pid > 1:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            except OSError as exc:
                environ = f"unreadable: {exc}"
            found.append([pid, environ])
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        return found

    @task
    def snoop():
        seen = {"environ": dict(os.environ), "ancestors": ancestors()}
        Path(os.environ["DUMP_PATH"]).write_text(json.dumps(seen))
        print("EXTRA=" + os.environ.get("EXTRA_VAR", "missing"))
        print("SCRUBBED=" + os.environ.get("MY_API_KEY", "gone"))
        return TaskResult(passed=True)

    @flow(name="Snoop")
    def snoop_flow():
        snoop()
''')


def assert_no_token_below(dump: Path, control_pid: int) -> None:
    seen = json.loads(dump.read_text())
    assert TOKEN not in json.dumps(seen["environ"])
    for pid, environ in seen["ancestors"]:
        if pid == control_pid:
            break  # the fork server and flow process are checked; see the next lines
        assert TOKEN not in environ, f"token visible in /proc/{pid}/environ"
    control = [environ for pid, environ in seen["ancestors"] if pid == control_pid]
    if not control:
        # The sandbox: the task's parent is init (pid 1); the control process is invisible.
        assert len(seen["ancestors"]) == 1, seen["ancestors"]
        return
    if os.geteuid() != 0:
        # The control process made itself undumpable: its environ is root's to read.
        assert TOKEN not in control[0]


@pytest.mark.timeout(60)
def test_worker_token_reaches_backend_but_no_task(tmp_path: Path) -> None:
    module = tmp_path / "snoop_flows.py"
    module.write_text(FLOWS)
    dump = tmp_path / "seen.json"
    env = {**os.environ, "PERFECT_TOKEN": TOKEN, "MY_API_KEY": "k", "DUMP_PATH": str(dump)}
    with FakePerfect(poll_hold=2.0) as fake:
        worker = subprocess.Popen(
            [sys.executable, "-m", "perfect_runner", "--flows", str(module), "--server",
             fake.url, "--log-dir", str(tmp_path / "logs"), "--scrub-env", "MY_API_*",
             "--task-env", "EXTRA_VAR=added", "--log-level", "DEBUG"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            fake.wait_for(lambda: fake.flows, 15)
            run_id = fake.trigger("Snoop")
            fake.wait_for(lambda: fake.run(run_id)["state"] in ("COMPLETED", "FAILED"), 20)
            lines = "\n".join(fake.logs(run_id)).splitlines()
        finally:
            worker.send_signal(signal.SIGTERM)
            output, _ = worker.communicate(timeout=10)
        auth = {r.headers.get("Authorization") for r in fake.requests}
    assert auth == {f"Bearer {TOKEN}"}
    assert "[Task Output] snoop: EXTRA=added" in lines
    assert "[Task Output] snoop: SCRUBBED=gone" in lines
    assert_no_token_below(dump, worker.pid)
    assert TOKEN not in output
    assert TOKEN not in "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))


LIMITS_FLOWS = textwrap.dedent('''
    import os, resource
    from perfect_runner import task, flow, TaskResult

    @task(crucial_pass=False)
    def whoami():
        print(f"uid={os.getuid()} gid={os.getgid()} groups={os.getgroups()}")
        print(f"cwd={os.getcwd()}")
        print(f"nofile={resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")
        print(f"core={resource.getrlimit(resource.RLIMIT_CORE)[0]}")
        open("written-by-task.txt", "w").write("x")

    @task(crucial_pass=False)
    def burn():
        while True:
            pass

    @flow(name="Identity")
    def identity():
        whoami()

    @flow(name="Burn")
    def burn_flow():
        burn()
''')


def run_cli(tmp_path: Path, flow: str, *options: str) -> tuple[subprocess.CompletedProcess, str]:
    module = tmp_path / "limits_flows.py"
    module.write_text(LIMITS_FLOWS)
    result = subprocess.run(
        [sys.executable, "-m", "perfect_runner", "--flows", str(module), "--run", flow,
         "--reports-dir", str(tmp_path / "r"), "--log-dir", str(tmp_path / "l"), *options],
        cwd=tmp_path, capture_output=True, text=True, timeout=50)
    record = next((tmp_path / "r").glob("*.json")).read_text()
    return result, record + "".join(p.read_text() for p in (tmp_path / "l").glob("*.log"))


@pytest.mark.timeout(60)
def test_fresh_workdir_per_task_and_resource_limits(tmp_path: Path) -> None:
    result, log = run_cli(tmp_path, "Identity", "--task-workdir", "tmp",
                          "--max-open-files", "77")
    assert result.returncode == 0, result.stderr
    assert "nofile=77" in log and "core=0" in log
    cwd = next(line for line in log.splitlines() if "cwd=" in line).split("cwd=")[1].strip()
    assert cwd != str(tmp_path) and "perfect-" in cwd
    assert not Path(cwd).exists(), "the task's temporary directory is removed afterwards"
    assert not (tmp_path / "written-by-task.txt").exists()


@pytest.mark.timeout(60)
def test_cpu_limit_is_reported(tmp_path: Path) -> None:
    result, log = run_cli(tmp_path, "Burn", "--cpu-limit", "1")
    assert result.returncode == 0  # non-crucial
    assert "crashed: SIGXCPU (cpu time limit exceeded)" in log


@pytest.mark.timeout(60)
def test_tasks_run_as_task_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("--task-user needs the tests to run as root")
    user = "perfect-test-task"
    created = subprocess.run(["useradd", "--system", "--no-create-home", user],
                             capture_output=True).returncode == 0
    if not created and subprocess.run(["id", user], capture_output=True).returncode != 0:
        pytest.skip("cannot create a throwaway user here (no useradd)")
    try:
        tmp_path.chmod(0o777)
        result, log = run_cli(tmp_path, "Identity", "--task-user", user)
        uid = int(subprocess.run(["id", "-u", user], capture_output=True, text=True).stdout)
        assert result.returncode == 0, result.stderr
        assert f"uid={uid} " in log
        assert "groups=[]" in log
    finally:
        if created:
            subprocess.run(["userdel", user], capture_output=True)


@pytest.mark.timeout(60)
def test_root_worker_without_task_user_warns(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only a root worker warns")
    result, _ = run_cli(tmp_path, "Identity")
    assert "tasks run as root too" in result.stderr


def trickling_server(stop: threading.Event) -> tuple[socket.socket, threading.Thread]:
    """A hostile backend: answers headers, then one body byte every 0.1 s, forever."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n")
            while not stop.wait(0.1):
                try:
                    conn.sendall(b" ")
                except OSError:
                    break
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


@pytest.mark.timeout(30)
def test_a_trickling_backend_cannot_hold_a_request_past_its_deadline() -> None:
    from perfect_runner.transport.api import ApiStatus, PerfectAPIClient

    stop = threading.Event()
    server, thread = trickling_server(stop)
    try:
        client = PerfectAPIClient(f"http://127.0.0.1:{server.getsockname()[1]}",
                                  read_timeout=1.0)
        started = time.monotonic()
        result = client.send_heartbeat(timeout=(1.0, 1.0))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(5)
        server.close()
    assert result.status is ApiStatus.RETRYABLE
    assert "deadline" in result.error
    assert elapsed < 3.0  # each byte came within the read timeout; the total did not


@pytest.mark.timeout(30)
@pytest.mark.parametrize("body", [
    b"[" * 200_000 + b"]" * 200_000,  # nested deeper than any JSON parser recurses
    b'{"run_id": "' + b"x" * 900_000 + b'", "flow_name": "f"}',
    b'{"run_id": 5, "flow_name": ["not", "a", "name"]}',
    b"\xff\xfe not even text",
])
def test_hostile_execution_requests_are_refused_not_fatal(body: bytes) -> None:
    from perfect_runner.transport.api import BadRequest, PerfectAPIClient

    with FakePerfect(poll_hold=1.0) as fake:
        fake.respond_with("/api/execution-requests", 200, body, count=1)
        client = PerfectAPIClient(fake.url)
        with pytest.raises(BadRequest):
            client.poll_once()
        assert client.poll_once() is None  # and the next poll is business as usual


def memory_contains(pid: int, needle: bytes) -> bool:
    """Whether any readable mapping of the process holds `needle`."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except (OSError, OverflowError, ValueError):
                continue  # [vvar] and friends cannot be read
    return False


@pytest.mark.timeout(60)
def test_token_is_in_no_memory_but_the_control_process(tmp_path: Path) -> None:
    import psutil

    module = tmp_path / "snoop_flows.py"
    module.write_text(textwrap.dedent('''
        import os
        from pathlib import Path
        from perfect_runner import task, flow

        @task
        def wait_here():
            Path(os.environ["DUMP_PATH"]).write_text(str(os.getpid()))
            Path(os.environ["DUMP_PATH"] + ".go").exists() or __import__("time").sleep(30)

        @flow(name="Hold")
        def hold():
            wait_here()
    '''))
    marker = tmp_path / "task.pid"
    env = {**os.environ, "PERFECT_TOKEN": TOKEN, "DUMP_PATH": str(marker)}
    with FakePerfect(poll_hold=2.0) as fake:
        worker = subprocess.Popen(
            [sys.executable, "-m", "perfect_runner", "--flows", str(module), "--server",
             fake.url, "--log-dir", str(tmp_path / "logs")],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            fake.wait_for(lambda: fake.flows, 15)
            fake.trigger("Hold")
            task_pid = host_pid(int(fake.wait_for(lambda: marker.exists() and marker.read_text(),
                                                  20)), under=worker.pid)
            others = [p.pid for p in psutil.Process(worker.pid).children(recursive=True)]
            assert task_pid in others and len(others) >= 3  # fork server, flow, task
            try:
                assert memory_contains(worker.pid, TOKEN.encode()), "the probe finds it here"
            except PermissionError:
                pytest.skip("cannot read process memory here (ptrace restrictions)")
            for pid in others:
                assert not memory_contains(pid, TOKEN.encode()), f"token in memory of {pid}"
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(10)
