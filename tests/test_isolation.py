"""Isolation: every task call in its own process, every way a child can die named
exactly, output captured at the fd level, nothing unpickled or imported in the
control process, nothing left running. Real processes, real signals."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import HEADER, Ran, Recorder, descendants, execute_flow, is_gone, is_gone_in

from perfect_runner.executor.engine import FlowExecutor
from perfect_runner.executor.options import RunOptions

START_METHODS = ["forkserver", "spawn"]

FAULTS = """
@task(crucial_pass=False)
def segfault():
    print("about to read address 0", flush=True)
    ctypes.string_at(0)


@task(crucial_pass=False)
def abort():
    os.abort()


@task(crucial_pass=False)
def exit_three():
    os._exit(3)


@task(crucial_pass=False)
def exit_zero():
    sys.exit(0)


@task(crucial_pass=False)
def self_kill():
    os.kill(os.getpid(), signal.SIGKILL)


@task(crucial_pass=False)
def keyboard_interrupt():
    raise KeyboardInterrupt


@task(crucial_pass=False)
def sigint_self():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)


@task(crucial_pass=False, timeout=1)
def hang():
    print("hanging", flush=True)
    time.sleep(60)


@task(crucial_pass=False, timeout=1)
def ignore_soft_stop():
    while True:
        try:
            time.sleep(60)
        except BaseException:
            print("ignoring the soft stop", flush=True)


@task(crucial_pass=False, memory_limit="100MB")
def memory_hog():
    hoard = []
    for _ in range(40):  # stops by itself at 400 MB
        hoard.append(b"x" * (10 * 1024 * 1024))
        time.sleep(0.01)
    time.sleep(5)  # hold it: the sampler sees it even if growth was too fast
    return TaskResult(passed=True, note="the memory limit was not enforced")


@task
def healthy():
    return TaskResult(passed=True, note=f"healthy in {os.getpid()}")


@flow("faults")
def faults():
    for fault in (segfault, abort, exit_three, exit_zero, self_kill, keyboard_interrupt,
                  sigint_self, hang, ignore_soft_stop, memory_hog):
        assert fault() is None, "a non-crucial failure returns None"
        print(f"flow survived {fault.__name__}", flush=True)
    healthy()
"""

EXPECTED_NOTES = {
    "segfault": "crashed: SIGSEGV (segmentation fault)",
    "abort": "crashed: SIGABRT (aborted)",
    "exit_three": "exited with code 3 before returning a result",
    "exit_zero": "called sys.exit(0) before returning a result",
    "self_kill": "crashed: SIGKILL (killed)",
    "keyboard_interrupt": "interrupted: KeyboardInterrupt raised inside the task",
    "sigint_self": "interrupted: KeyboardInterrupt raised inside the task",
    "hang": "timed out after 1.0 s",
    "ignore_soft_stop": "timed out after 1.0 s; killed after grace",
}


@pytest.fixture(scope="module", params=START_METHODS)
def faults_run(request, tmp_path_factory) -> Ran:
    tmp = tmp_path_factory.mktemp("faults")
    path = tmp / f"faults_{request.param}.py"
    path.write_text(HEADER.format(tmp=str(tmp)) + FAULTS, encoding="utf-8")
    return execute_flow(path, "faults", request.param, RunOptions(kill_grace=0.3))


@pytest.mark.parametrize("name", sorted(EXPECTED_NOTES))
def test_each_child_death_has_its_exact_note(faults_run: Ran, name: str) -> None:
    task = faults_run.task(name)
    assert task.state == "FAILED"
    # Evidence from the child's stderr may follow the note, after "; last stderr:".
    assert task.note.split("; last stderr:")[0] == EXPECTED_NOTES[name]


def test_memory_limit_kills_the_task(faults_run: Ran) -> None:
    task = faults_run.task("memory_hog")
    assert task.state == "FAILED"
    assert task.note.startswith("killed: memory limit"), task.note
    assert task.peak_rss and task.peak_rss > 100_000_000
    assert task.duration_ms < 4000  # killed while growing or holding, not at the end


def test_flow_survives_every_fault_and_runs_on(faults_run: Ran) -> None:
    assert faults_run.record.state == "COMPLETED"  # every fault was non-crucial
    survived = [line for line in faults_run.events.lines(None) if line.startswith("flow survived")]
    assert len(survived) == 10
    assert faults_run.task("healthy").state == "COMPLETED"
    assert [t.index for t in faults_run.events.finished()] == list(range(11))


def test_segfault_evidence_and_timeout_stack_dump(faults_run: Ran) -> None:
    events = faults_run.events
    segv = faults_run.task("segfault")
    assert "about to read address 0" in events.lines(segv.index, "stdout")
    assert any("Segmentation fault" in line for line in events.lines(segv.index, "stderr"))
    hang = faults_run.task("hang")
    stderr = events.lines(hang.index, "stderr")
    assert any("in hang" in line for line in stderr), stderr  # faulthandler's dump at timeout


def test_each_task_call_runs_in_its_own_process(faults_run: Ran) -> None:
    note = faults_run.task("healthy").note
    pid = int(note.rsplit(" ", 1)[1])
    assert pid != os.getpid()


# --- results and exceptions crossing the boundary -----------------------------------

ROUND_TRIP = """
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return (self.x, self.y) == (other.x, other.y)


@task
def make_point(x, y=0):
    return Point(x, y)


@task
def explode(value):
    try:
        {}["missing"]
    except KeyError as exc:
        raise ValueError(f"cannot use {value}") from exc


@flow("round trip")
def round_trip():
    point = make_point(2, y=3)
    print(f"point {type(point).__name__} {point.x},{point.y} {point == Point(2, 3)}")
    try:
        explode(42)
    except ValueError as exc:
        print(f"caught {type(exc).__name__}: {exc}")
        print(f"cause {exc.__cause__!r}")
        names = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
        print(f"frames {' '.join(names)}")
    print("flow body went on")
"""


@pytest.mark.parametrize("start_method", START_METHODS)
def test_results_and_exceptions_round_trip_with_child_traceback(
        write_flows, run_flow, start_method: str) -> None:
    ran = run_flow(write_flows(ROUND_TRIP), "round trip", start_method)
    flow_lines = ran.events.lines(None, "stdout")
    assert "point Point 2,3 True" in flow_lines
    assert "caught ValueError: cannot use 42" in flow_lines
    assert "cause KeyError('missing')" in flow_lines
    (frames,) = [line for line in flow_lines if line.startswith("frames ")]
    assert "explode" in frames.split()  # the task's own frame, from the child
    assert "flow body went on" in flow_lines
    explode = ran.task("explode")
    assert explode.state == "FAILED" and explode.note == "ValueError: cannot use 42"
    assert ran.task("make_point").state == "COMPLETED"
    # The crucial task failed, so the run failed even though the body went on.
    assert ran.record.state == "FAILED"
    assert [t.name for t in ran.record.tasks] == ["make_point", "explode"]


UNPICKLING = """
def write_marker(path):
    Path(path).write_text(str(os.getpid()))
    return "unpickled"


class Booby:
    def __reduce__(self):
        return (write_marker, (str(TMP / "marker"),))


@task
def booby():
    return Booby()


@flow("unpickling")
def unpickling():
    print(f"flow pid {os.getpid()}", flush=True)
    print(f"got {booby()}")
"""


@pytest.mark.parametrize("start_method", START_METHODS)
def test_only_the_flow_process_unpickles(write_flows, run_flow, tmp_path: Path,
                                         start_method: str) -> None:
    ran = run_flow(write_flows(UNPICKLING), "unpickling", start_method)
    assert ran.record.state == "COMPLETED"
    flow_lines = ran.events.lines(None, "stdout")
    assert "got unpickled" in flow_lines
    flow_pid = int(next(line for line in flow_lines if line.startswith("flow pid"))[9:])
    marker_pid = int((tmp_path / "marker").read_text())
    assert marker_pid == flow_pid
    assert marker_pid != os.getpid()
    # run_flow also checked that the flows module is not in this process's sys.modules


UNSENDABLE = """
import threading


@task(crucial_pass=False)
def takes(value):
    return TaskResult(passed=True)


@task(crucial_pass=False)
def gives_lock():
    return threading.Lock()


@task(crucial_pass=False)
def gives_big():
    return b"x" * (2 * 1024 * 1024)


@task
def small():
    return b"x" * 1000


@flow("unsendable")
def unsendable():
    print(f"takes -> {takes(threading.Lock())}")
    print(f"gives_lock -> {gives_lock()}")
    print(f"gives_big -> {gives_big()}")
    print(f"small -> {len(small())}")
"""


def test_unpicklable_arguments_results_and_oversized_results(write_flows, run_flow) -> None:
    ran = run_flow(write_flows(UNSENDABLE), "unsendable",
                   options=RunOptions(max_result=1024 * 1024))
    takes, gives_lock, gives_big = (ran.task(n) for n in ("takes", "gives_lock", "gives_big"))
    assert takes.state == "FAILED"
    assert "arguments of task 'takes' could not be pickled" in takes.note
    assert "lock" in takes.note
    assert gives_lock.state == "FAILED"
    assert gives_lock.note.startswith("result of task 'gives_lock' could not be pickled: lock")
    assert gives_big.state == "FAILED"
    assert gives_big.note == ("result of task 'gives_big' is 2.0 MiB, over the result size "
                              "cap of 1.0 MiB")
    flow_lines = ran.events.lines(None, "stdout")
    for name in ("takes", "gives_lock", "gives_big"):
        assert f"{name} -> None" in flow_lines  # non-crucial: the call returns None
    assert "small -> 1000" in flow_lines
    assert ran.record.state == "COMPLETED"


# --- output, stdin ------------------------------------------------------------------

OUTPUT = """
@task
def noisy():
    print("from python stdout", flush=True)
    os.system("echo hi")
    libc = ctypes.CDLL(None)
    libc.write(2, b"from C on fd 2\\n", 15)
    print("from python stderr", file=sys.stderr, flush=True)
    sys.stdout.write("no newline at the end")
    return TaskResult(passed=True)


@flow("output")
def output():
    print("from the flow body")
    noisy()
"""


@pytest.mark.parametrize("start_method", START_METHODS)
def test_output_is_captured_at_the_fd_level(write_flows, run_flow, start_method: str) -> None:
    ran = run_flow(write_flows(OUTPUT), "output", start_method)
    index = ran.task("noisy").index
    stdout = ran.events.lines(index, "stdout")
    stderr = ran.events.lines(index, "stderr")
    assert stdout[:2] == ["from python stdout", "hi"]
    assert stdout[-1] == "no newline at the end"
    assert "from C on fd 2" in stderr
    assert "from python stderr" in stderr
    assert "from the flow body" in ran.events.lines(None, "stdout")


STDIN = """
@task
def ask():
    return input("your name? ")


@flow("stdin")
def stdin():
    ask()
"""


def test_stdin_is_dev_null(write_flows, run_flow) -> None:
    ran = run_flow(write_flows(STDIN), "stdin")
    ask = ran.task("ask")
    assert ask.state == "FAILED"
    assert ask.note == "EOFError: EOF when reading a line"
    assert ask.duration_ms < 5000
    assert ran.record.state == "FAILED"


# --- nothing outlives its task --------------------------------------------------------

BACKGROUND = """
@task
def start_sleeper():
    sleeper = subprocess.Popen(["sleep", "1000"])
    print(f"sleeper {sleeper.pid} {os.readlink('/proc/self/ns/pid')}", flush=True)
    return TaskResult(passed=True)


@task
def after():
    return TaskResult(passed=True)


@flow("background")
def background():
    start_sleeper()
    after()
"""


@pytest.mark.parametrize("start_method", START_METHODS)
def test_background_subprocess_dies_with_its_task(write_flows, run_flow,
                                                  start_method: str) -> None:
    seen: dict[str, Any] = {}

    def on_event(kind: str, data) -> None:
        if kind == "task_output" and data[1] == "stdout":
            for line in data[2]:
                if line.startswith("sleeper "):
                    seen["sleeper"] = reported_process(line)
        if kind == "task_started" and data.name == "after":
            # The task that started it is over: its sleeper must already be gone.
            seen["gone_before_next_task"] = is_gone_in(*seen["sleeper"])

    ran = run_flow(write_flows(BACKGROUND), "background", start_method,
                   listener=Recorder(on_event))
    assert ran.record.state == "COMPLETED"
    assert seen["gone_before_next_task"]
    assert is_gone_in(*seen["sleeper"])


def reported_process(line: str) -> tuple[str, int]:
    """(PID namespace, pid there) from a task's "<what> <pid> <namespace>" line."""
    _, pid, namespace = line.split()
    return namespace, int(pid)


def test_executor_close_leaves_no_process(write_flows) -> None:
    before = {p.pid for p in descendants()}
    executor = FlowExecutor([str(write_flows(STDIN))])
    server = executor.launcher.server_pid
    assert server in {p.pid for p in descendants()}
    executor.close()
    assert is_gone(server)
    assert {p.pid for p in descendants()} - before == set()


def test_flows_module_is_not_imported_by_the_control_process(write_flows) -> None:
    path = write_flows(STDIN)
    executor = FlowExecutor([str(path)], "spawn")
    try:
        assert list(executor.flows) == ["stdin"]
    finally:
        executor.close()
    assert path.stem not in sys.modules
    assert not any(getattr(m, "__file__", None) == str(path) for m in list(sys.modules.values()))


def test_signal_names_are_rendered_in_one_place() -> None:
    from perfect_runner.isolation.outcome import describe_signal

    assert describe_signal(signal.SIGSEGV) == "SIGSEGV (segmentation fault)"
    assert describe_signal(signal.SIGKILL) == "SIGKILL (killed)"
    assert describe_signal(250) == "signal 250"


DAEMON = """
@task
def start_daemon():
    # A new session: the daemon leaves the task's process group.
    daemon = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    print(f"daemon {daemon.pid} {os.readlink('/proc/self/ns/pid')}", flush=True)
    return TaskResult(passed=True)


@task(crucial_pass=False)
def start_daemon_then_crash():
    daemon = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    print(f"daemon {daemon.pid} {os.readlink('/proc/self/ns/pid')}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no chance to clean up after itself


@flow("daemon")
def daemon_flow():
    start_daemon()


@flow("daemon then crash")
def daemon_crash_flow():
    start_daemon_then_crash()
"""


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("flow", ["daemon", "daemon then crash"])
def test_a_daemon_in_its_own_session_dies_with_its_task(write_flows, run_flow,
                                                        start_method: str, flow: str) -> None:
    ran = run_flow(write_flows(DAEMON), flow, start_method)
    assert ran.record.state == "COMPLETED"
    (line,) = ran.events.lines(0, "stdout")
    assert is_gone_in(*reported_process(line)), f"the daemon ({line}) outlived its task"


ODD_ENDINGS = """
class Stubborn(Exception):
    def __init__(self, a, b):  # cannot be rebuilt from its args alone
        super().__init__(f"{a}-{b}")


class Locked(Exception):
    def __init__(self):
        super().__init__("holds a lock")
        self.lock = __import__("threading").Lock()  # cannot be pickled at all


@task(crucial_pass=False)
def junk_on_channel():
    os.write(3, b"\\x00\\x00\\x00\\x05\\x00\\x00\\x00\\x00hello")
    return TaskResult(passed=True)


@task(crucial_pass=False)
def stubborn():
    raise Stubborn(1, 2)


@task
def locked():
    raise Locked()


@flow("odd endings")
def odd_endings():
    junk_on_channel()
    stubborn()
    try:
        locked()
    except Exception as exc:
        print(f"flow saw {type(exc).__name__}: {exc}")
"""


def test_protocol_breach_and_unpicklable_exception(write_flows, run_flow) -> None:
    ran = run_flow(write_flows(ODD_ENDINGS), "odd endings")
    junk = ran.task("junk_on_channel")
    assert junk.state == "FAILED"
    assert junk.note.startswith("broke the runner protocol: malformed frame header")
    assert ran.task("stubborn").note == "Stubborn: 1-2"
    assert ran.task("locked").note == "Locked: holds a lock"
    # That exception could not cross, so the flow body gets TaskFailed with the same note.
    flow_lines = ran.events.lines(None)
    assert "flow saw TaskFailed: Task 'locked' failed: Locked: holds a lock" in flow_lines


CUSTOM_EXCEPTION = """
class Stubborn(Exception):
    def __init__(self, a, b):  # tblib rebuilds it without calling __init__
        super().__init__(f"{a}-{b}")
        self.a = a


@task
def stubborn():
    raise Stubborn(1, 2)


@flow("custom exception")
def custom_exception():
    try:
        stubborn()
    except Stubborn as exc:
        print(f"flow saw {type(exc).__name__}: {exc} a={exc.a}")
"""


def test_custom_exception_with_its_own_init_crosses(write_flows, run_flow) -> None:
    ran = run_flow(write_flows(CUSTOM_EXCEPTION), "custom exception")
    assert "flow saw Stubborn: 1-2 a=1" in ran.events.lines(None)


LEAKY = '''
import os, signal, sys, threading, time
from perfect_runner import task, flow, TaskResult

COUNTER = {"calls": 0}

@task
def meddle():
    os.chdir("/")
    os.environ["LEAKED_VAR"] = "yes"
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    sys.path.insert(0, "/nowhere")
    COUNTER["calls"] += 1
    threading.Thread(target=time.sleep, args=(600,), daemon=False).start()
    held = open(__file__)  # left open on purpose
    return TaskResult(passed=True, note=f"calls={COUNTER['calls']}")

@task
def inspect():
    seen = {
        "cwd": os.getcwd() != "/",
        "env": "LEAKED_VAR" not in os.environ,
        "signal": signal.getsignal(signal.SIGUSR2) is not signal.SIG_IGN,
        "sys.path": "/nowhere" not in sys.path,
        "globals": COUNTER["calls"] == 0,
        "threads": threading.active_count() == 1,
    }
    bad = [name for name, clean in seen.items() if not clean]
    return TaskResult(passed=not bad, note="leaked: " + ", ".join(bad) if bad else "clean",
                      table=[{"fds": len(os.listdir('/proc/self/fd'))}])

@flow(name="leaks")
def leaks():
    meddle()
    inspect()
    meddle()
    inspect()
'''


def test_nothing_a_task_changes_reaches_the_next_task(write_flows, run_flow) -> None:
    cwd, env = os.getcwd(), dict(os.environ)
    ran = run_flow(write_flows(LEAKY), "leaks")
    assert [(t.name, t.state, t.note) for t in ran.record.tasks] == [
        ("meddle", "COMPLETED", "calls=1"), ("inspect", "COMPLETED", "clean"),
        ("meddle", "COMPLETED", "calls=1"), ("inspect", "COMPLETED", "clean")]
    # Each task starts with the same few descriptors: nothing left open accumulates.
    assert ran.record.tasks[1].table == ran.record.tasks[3].table
    assert (os.getcwd(), dict(os.environ)) == (cwd, env)  # nor does anything reach us


FAST_ALLOCATOR = '''
@task(memory_limit="150MB", crucial_pass=False)
def gulp():
    # One allocation far past the limit, faster than any sampling could see.
    block = bytearray(400 * 1024 * 1024)
    return TaskResult(passed=True, note=f"got {len(block)} bytes")


@flow("fast allocator")
def fast_allocator():
    gulp()
'''


def test_hard_memory_cap_stops_allocations_faster_than_sampling(write_flows, run_flow) -> None:
    from perfect_runner.executor.options import RunOptions

    ran = run_flow(write_flows(FAST_ALLOCATOR), "fast allocator",
                   options=RunOptions(hard_memory_cap=True))
    (task,) = ran.record.tasks
    assert (task.state, task.note) == ("FAILED", "MemoryError")


EXEC_SEES = """
import subprocess


@task
def what_a_program_inherits():
    # A program the task runs (close_fds=False, as os.system and exec do) sees the
    # task's std fds and nothing of the runner's: no channel, no payload channel.
    listing = subprocess.run(["ls", "/proc/self/fd"], close_fds=False, capture_output=True,
                             text=True, check=True).stdout.split()
    return TaskResult(passed=True, note=" ".join(sorted(listing, key=int)))


@flow("exec")
def exec_flow():
    what_a_program_inherits()
"""


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_program_a_task_runs_inherits_no_channel_of_the_runner(write_flows, run_flow,
                                                                 start_method: str) -> None:
    ran = run_flow(write_flows(EXEC_SEES), "exec", start_method)
    (task,) = ran.record.tasks
    assert task.state == "COMPLETED", task.note
    # 0-2: its stdio; 3: the directory `ls` itself is reading. Nothing more.
    assert task.note == "0 1 2 3", task.note
