"""The sandbox (`--sandbox`): what each mode guarantees, tried by hostile tasks.

Real processes throughout. "namespace": the fork server is init of a PID and
mount namespace of its own; "off": plain processes, the fork server a
subreaper that kills everything below it when the control process dies.
`PERFECT_TEST_SANDBOX_FAIL=<step>` (test only) makes the probe fail at a step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, execute_flow, pid_namespace, run_cli

from perfect_runner.executor.options import RunOptions
from perfect_runner.isolation.proctree import wait_gone
from perfect_runner.isolation.sandbox import FAIL_ENV

MODES = ["namespace", "off"]
TOKEN = "tok-sandbox-7c1e-never-leak"

HOSTILE = textwrap.dedent('''
    import ctypes, json, os, signal, subprocess, sys, time
    from pathlib import Path
    from perfect_runner import task, flow, TaskResult

    MARK = Path(__file__).parent

    def wait_for(path):
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if path.exists() and (text := path.read_text()):
                return text
            time.sleep(0.01)
        return path.read_text()

    def ns():
        return os.readlink("/proc/self/ns/pid")

    @task
    def daemon_then_wait():
        # A grandchild in its own session, as a daemon would: not in the task's group.
        daemon = subprocess.Popen(["sleep", "331"], start_new_session=True)
        (MARK / "ready").write_text(json.dumps([ns(), daemon.pid]))
        time.sleep(60)

    @task
    def strike():
        """Kill what runs us: our parent (the fork server), the control process."""
        said = {}
        control = int(wait_for(MARK / "control.pid"))
        for name, pid, sig in (("parent", os.getppid(), signal.SIGKILL),
                               ("parent-term", os.getppid(), signal.SIGTERM),
                               ("control", control, signal.SIGKILL)):
            try:
                os.kill(pid, sig)
                said[name] = "sent"
            except OSError as exc:
                said[name] = type(exc).__name__
        time.sleep(0.2)  # a signal that worked has killed us (or our parent) by now
        print("STRUCK " + json.dumps(said), flush=True)
        return TaskResult(passed=True, note="still here")

    @task
    def fine():
        return TaskResult(passed=True, note="fine")

    @flow(name="Daemon")
    def daemon_flow():
        daemon_then_wait()

    @flow(name="Strike")
    def strike_flow():
        strike()

    @flow(name="Fine")
    def fine_flow():
        fine()
''')


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    path = tmp_path / "hostile_flows.py"
    path.write_text(HOSTILE)
    return path


def cli(module: Path, tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "perfect_runner", "--flows", str(module),
            "--reports-dir", str(tmp_path / "r"), "--log-dir", str(tmp_path / "l"), *args]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERFECT_")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def wait_file(path: Path, limit: float = 20.0) -> str:
    # The child writes it: poll its appearance (a child's word, not a guess of time).
    # write_text creates the file before it writes: wait for the (one-write) content too.
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if path.exists() and (text := path.read_text()):
            return text
        time.sleep(0.01)
    return path.read_text()


# --- SIGKILL of the control process leaves nothing ---------------------------------


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
@pytest.mark.parametrize("mode", MODES)
def test_sigkill_of_the_control_process_leaves_nothing(hostile: Path, tmp_path: Path,
                                                       mode: str, start_method: str) -> None:
    control = subprocess.Popen(cli(hostile, tmp_path, "--run", "Daemon", "--sandbox", mode,
                                   "--start-method", start_method),
                               env=child_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        namespace, _ = json.loads(wait_file(tmp_path / "ready"))
        below = psutil.Process(control.pid).children(recursive=True)
        assert (namespace != pid_namespace()) == (mode == "namespace")
        sleepers = [p for p in below if p.name() == "sleep"]
        assert len(sleepers) == 1, "the setsid'ed daemon is below the control process"
        assert os.getsid(sleepers[0].pid) != os.getsid(control.pid)
    finally:
        control.send_signal(signal.SIGKILL)
        control.wait(10)
    left = wait_gone([p.pid for p in below], timeout=5.0)
    assert left == [], f"outlived the control process: {left}"


# --- a task cannot stop the worker -----------------------------------------------------


def test_a_task_cannot_kill_its_fork_server_or_the_control_process(hostile: Path,
                                                                   tmp_path: Path) -> None:
    control = subprocess.Popen(
        cli(hostile, tmp_path, "--run", "Strike", "--run", "Fine", "--sandbox", "namespace"),
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (tmp_path / "control.pid").write_text(str(control.pid))
    output, _ = control.communicate(timeout=40)
    assert control.returncode == 0, output
    struck = json.loads(next(ln for ln in output.splitlines() if "STRUCK" in ln)
                        .split("STRUCK ", 1)[1])
    # Init ignores what it has no handler for; the control process does not exist here.
    assert struck == {"parent": "sent", "parent-term": "sent",
                      "control": "ProcessLookupError"}
    assert "Strike: COMPLETED" in output and "Fine: COMPLETED" in output
    assert "fork server" not in output, "the fork server never died"


def test_without_the_sandbox_a_task_killing_its_fork_server_fails_only_its_run(
        hostile: Path, tmp_path: Path) -> None:
    """Off: the fork server can be killed by a task; the worker heals (more in
    test_forkserver_heal.py). The control process is the worker's to protect:
    run tasks as another user (--task-user) to keep them from signalling it."""
    (tmp_path / "control.pid").write_text("999999999")  # no process: nothing to strike
    result = run_cli("--flows", str(hostile), "--run", "Strike", "--run", "Fine",
                     "--sandbox", "off", cwd=tmp_path)
    assert "fork server" in result.stderr and "died (killed by SIGKILL)" in result.stderr
    assert "Fine: COMPLETED" in result.stdout


# --- a root task finds the token nowhere ---------------------------------------------

SNOOP = textwrap.dedent('''
    import ctypes, json, os
    from pathlib import Path
    from perfect_runner import task, flow, TaskResult

    # Built in the task only (reversed): no other process of ours may hold the needle.
    TOKEN = b""
    libc = ctypes.CDLL(None, use_errno=True)

    def pids():
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]

    def ancestors():
        found, pid = [], os.getpid()
        while pid > 1:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
            found.append(pid)
        return found

    def in_memory(pid):
        try:
            with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
                for line in maps:
                    span, perms = line.split()[:2]
                    if perms.startswith("r"):
                        start, end = (int(x, 16) for x in span.split("-"))
                        try:
                            mem.seek(start)
                            if TOKEN in mem.read(end - start):
                                return True
                        except (OSError, OverflowError, ValueError):
                            pass
        except OSError:
            pass
        return False

    def found_in_proc():
        hits = []
        for pid in pids():
            try:
                if TOKEN in Path(f"/proc/{pid}/environ").read_bytes():
                    hits.append(f"environ of {pid}")
            except OSError:
                pass
        visible = pids()
        # Every process when we see few (the sandbox); else our ancestors.
        for pid in (visible if len(visible) < 30 else ancestors()):
            if pid not in SNOOPERS and in_memory(pid):
                hits.append(f"memory of {pid}")
        return hits

    def attempt(name, call):
        rc = call()
        return f"{name}: " + ("ok" if rc == 0 else os.strerror(ctypes.get_errno()))

    SNOOPERS = set()  # the task and its helper hold the needle themselves

    @task
    def snoop():
        global TOKEN
        TOKEN = os.environ["LOOK_FOR"][::-1].encode()
        SNOOPERS.add(os.getpid())
        hits = found_in_proc()
        if TOKEN in json.dumps(dict(os.environ)).encode():
            hits.append("own environment")
        if os.readlink("/proc/self/ns/mnt") == os.environ["HOST_MOUNTS"]:
            # Without the sandbox a root task could unmount the host's /proc: never here.
            print("SNOOP " + json.dumps({"hits": hits}), flush=True)
            return TaskResult(passed=True)
        tries = [attempt("umount /proc", lambda: libc.umount2(b"/proc", 2)),
                 attempt("unshare mount ns", lambda: libc.unshare(0x00020000))]
        if os.fork() == 0:
            SNOOPERS.add(os.getpid())
            # A user namespace of its own, then a mount namespace: unmount /proc there.
            code = 1
            try:
                if libc.unshare(0x10000000 | 0x00020000) == 0:
                    libc.umount2(b"/proc", 2)
                    libc.mount(b"proc", b"/proc", b"proc", 0, None)
                    code = 3 if found_in_proc() else 0
            finally:
                os._exit(code)
        _, status = os.wait()
        tries.append(f"user+mount ns: {os.waitstatus_to_exitcode(status)}")
        status = Path("/proc/self/status").read_text()
        caps = status.split("CapEff:")[1].split()[0]
        print("SNOOP " + json.dumps({"hits": hits, "tries": tries, "caps": caps}), flush=True)
        return TaskResult(passed=True)

    @flow(name="Snoop")
    def snoop_flow():
        snoop()
''')

DOCKER_CAPS = "00000000a80425fb"


@pytest.mark.parametrize("mode", MODES)
def test_a_root_task_finds_the_token_nowhere_in_the_sandbox(tmp_path: Path, mode: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("a root task needs a root worker")
    module = tmp_path / "snoop_flows.py"
    module.write_text(SNOOP)
    # The token in the control process's environment and memory; LOOK_FOR (not a
    # secret's name, so not scrubbed) tells the task what to look for, reversed.
    done = subprocess.run(cli(module, tmp_path, "--run", "Snoop", "--sandbox", mode),
                          env=child_env(PERFECT_TOKEN=TOKEN, LOOK_FOR=TOKEN[::-1],
                                        HOST_MOUNTS=os.readlink("/proc/self/ns/mnt")),
                          capture_output=True, text=True, timeout=50)
    line = next(ln for ln in done.stdout.splitlines() if "SNOOP " in ln)
    seen = json.loads(line.split("SNOOP ", 1)[1])
    if mode == "off":
        # The documented weakness: the scan works, and finds the control process's.
        assert seen["hits"], seen
        return
    assert seen["hits"] == [], seen
    assert seen["caps"] == DOCKER_CAPS
    assert seen["tries"][:2] == ["umount /proc: Operation not permitted",
                                 "unshare mount ns: Operation not permitted"]
    assert seen["tries"][2] in ("user+mount ns: 0", "user+mount ns: 1"), seen  # never 3


# --- limits work in both modes ------------------------------------------------------

LIMITS = '''
import os, resource, time
from perfect_runner import task, flow, TaskResult

@task(crucial_pass=False, memory_limit="64MB")
def hog():
    resource.setrlimit(resource.RLIMIT_AS, (600 * 2**20, 600 * 2**20))
    hoard = []
    for _ in range(30):  # stops by itself at 300 MB
        hoard.append(b"x" * (10 * 2**20))
        time.sleep(0.01)
    time.sleep(5)

@task(crucial_pass=False, timeout=0.5)
def hang():
    time.sleep(30)

@task(crucial_pass=False)
def forker():
    for _ in range(20):  # bounded: --max-procs 5 stops it first
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
    time.sleep(30)

@flow("limits")
def limits():
    hog()
    hang()
    forker()
'''


@pytest.mark.parametrize("mode", MODES)
def test_memory_timeout_and_process_limits_hold_in_both_modes(write_flows, mode: str) -> None:
    ran = execute_flow(write_flows(LIMITS), "limits", options=RunOptions(max_procs=5,
                                                                       kill_grace=0.2),
                       sandbox=mode)
    assert ran.executor.launcher.sandbox.mode == mode
    notes = {t.name: t.note for t in ran.events.finished()}
    assert notes["hog"].startswith("killed: memory limit"), notes
    assert notes["hang"].startswith("timed out after 0.5 s"), notes
    assert notes["forker"].startswith("killed: process limit exceeded"), notes


# --- the probe and its fallback -----------------------------------------------------

LOOK = textwrap.dedent('''
    import os
    from perfect_runner import task, flow

    @task
    def look():
        print("NS " + os.readlink("/proc/self/ns/pid"), flush=True)

    @flow(name="Look")
    def look_flow():
        look()
''')


@pytest.mark.parametrize("step", ["unshare", "mount", "capset"])
def test_a_failing_probe_falls_back_with_one_warning(tmp_path: Path, step: str) -> None:
    module = tmp_path / "look_flows.py"
    module.write_text(LOOK)
    result = run_cli("--flows", str(module), "--run", "Look", cwd=tmp_path,
                     env={FAIL_ENV: step})
    assert result.code == 0, result.stderr
    warnings = [ln for ln in result.stderr.splitlines() if "sandbox unavailable" in ln]
    assert len(warnings) == 1, result.stderr
    assert f"forced by {FAIL_ENV}={step} (test only)" in warnings[0]
    assert "a task running as root can read the worker's token" in warnings[0]
    assert f"NS {pid_namespace()}" in result.stdout, "the task runs in our PID namespace"


def test_sandbox_namespace_refuses_to_start_when_the_probe_fails(tmp_path: Path) -> None:
    module = tmp_path / "look_flows.py"
    module.write_text(LOOK)
    result = run_cli("--flows", str(module), "--run", "Look", "--sandbox", "namespace",
                     cwd=tmp_path, env={FAIL_ENV: "mount"})
    assert result.code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "--sandbox namespace is not possible here: mounting a fresh /proc failed" in line
    assert "use --sandbox auto" in line


def test_auto_uses_the_namespace_here_and_off_does_not(tmp_path: Path) -> None:
    module = tmp_path / "look_flows.py"
    module.write_text(LOOK)
    auto = run_cli("--flows", str(module), "--run", "Look", cwd=tmp_path)
    off = run_cli("--flows", str(module), "--run", "Look", "--sandbox", "off", cwd=tmp_path)
    assert "sandbox unavailable" not in auto.stderr + off.stderr
    assert f"NS {pid_namespace()}" not in auto.stdout and "NS pid:[" in auto.stdout
    assert f"NS {pid_namespace()}" in off.stdout


# --- without root: a user namespace ---------------------------------------------------

USER = textwrap.dedent('''
    import os
    from pathlib import Path
    from perfect_runner import task, flow

    @task
    def who():
        caps = Path("/proc/self/status").read_text().split("CapEff:")[1].split()[0]
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        print(f"WHO uid={os.getuid()} ppid={os.getppid()} caps={caps} pids={pids}", flush=True)

    @flow(name="Who")
    def who_flow():
        who()
''')


def test_a_worker_without_root_gets_a_user_namespace(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to become the throwaway user 'nobody'")
    # Our interpreter lives under /root; a system one of the same version can run us.
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}",
                          path="/usr/bin:/usr/local/bin")
    if system is None:
        pytest.skip("no system Python of our version that another user may run")
    shared = Path(f"/tmp/perfect-sandbox-{os.getpid()}")
    shared.mkdir(mode=0o777, exist_ok=True)
    try:
        shared.chmod(0o777)
        (shared / "who_flows.py").write_text(USER)
        site = next(p for p in sys.path if p.endswith("site-packages"))
        done = subprocess.run(
            [system, "-m", "perfect_runner", "--flows", str(shared / "who_flows.py"),
             "--run", "Who", "--sandbox", "namespace", "--reports-dir", str(shared / "r"),
             "--log-dir", str(shared / "l")],
            cwd=shared, user=65534, group=65534, extra_groups=[],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{site}"},
            capture_output=True, text=True, timeout=50)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    if "not possible here" in done.stderr:
        pytest.skip(f"unprivileged user namespaces are off here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if "WHO " in ln)
    assert "uid=65534 ppid=1 caps=0000000000000000" in line
    pids = json.loads(line.split("pids=", 1)[1])
    assert max(pids) < 10, "only the namespace's few processes are visible"


# --- the sandbox heals too ------------------------------------------------------------


def test_when_init_is_killed_from_outside_a_new_sandbox_serves(write_flows) -> None:
    """As the OOM killer would: SIGKILL init. Its namespace goes with it, the stub
    ends the same way, and the launcher starts a new server in a new namespace."""
    from conftest import Recorder

    from perfect_runner.executor.engine import FlowExecutor

    executor = FlowExecutor([str(write_flows(LOOK))], sandbox="namespace")
    try:
        stub = executor.launcher.server_pid
        (init,) = psutil.Process(stub).children()
        os.kill(init.pid, signal.SIGKILL)
        psutil.Process(stub).wait(5)  # the stub ends with init
        end = time.monotonic() + 15
        while executor.launcher.restarts == 0 and time.monotonic() < end:
            time.sleep(0.01)  # the launcher's watcher says when the new one is up
        assert executor.launcher.restarts == 1
        assert executor.launcher.server_pid != stub
        record = executor.new_run("Look", Recorder()).execute()
        assert record.state == "COMPLETED"
    finally:
        executor.close()
