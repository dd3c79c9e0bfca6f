"""Shared helpers for the core tests: flows modules written into tmp_path, a
listener that records every event, and a runner that checks no process is left.

Everything here drives real processes; nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from perfect_runner.executor.engine import FlowExecutor
from perfect_runner.executor.events import NullListener
from perfect_runner.executor.options import RunOptions
from perfect_runner.executor.records import RunRecord, TaskRecord

REPO = Path(__file__).resolve().parent.parent

# Every flows module written by a test starts with these imports, and with TMP:
# the test's own tmp_path, for marker files and attempt counters.
HEADER = """\
import ctypes
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from perfect_runner import TaskResult, flow, report_progress, task

TMP = Path({tmp!r})


def wait_for_file(path, limit=20.0):
    # The test's listener creates `path` when it sees an event; poll for it.
    end = time.monotonic() + limit
    while not Path(path).exists():
        if time.monotonic() > end:
            raise TimeoutError(f"{{path}} never appeared")
        time.sleep(0.01)

"""


@pytest.fixture
def write_flows(tmp_path: Path) -> Callable[..., Path]:
    """write_flows(source) -> path of a new flows module (unique name) in tmp_path."""

    def write(source: str, name: str | None = None) -> Path:
        name = name or f"flows_{uuid.uuid4().hex[:10]}"
        path = tmp_path / f"{name}.py"
        path.write_text(HEADER.format(tmp=str(tmp_path)) + textwrap.dedent(source),
                        encoding="utf-8")
        return path

    return write


def module_flows(factory: pytest.TempPathFactory, name: str, source: str) -> Path:
    """A flows module `name`.py (HEADER + source) in a fresh directory, for a module-scoped
    fixture shared by many tests."""
    directory = factory.mktemp(name)
    path = directory / f"{name}.py"
    path.write_text(HEADER.format(tmp=str(directory)) + source, encoding="utf-8")
    return path


def snapshot(task: TaskRecord) -> TaskRecord:
    return dataclasses.replace(task, table=list(task.table))


class Recorder(NullListener):
    """Stores every event, with a snapshot of the task record at that moment."""

    def __init__(self, on_event: Callable[[str, Any], None] | None = None) -> None:
        self.events: list[tuple[str, Any]] = []
        self.on_event = on_event

    def _add(self, kind: str, data: Any) -> None:
        self.events.append((kind, data))
        if self.on_event:
            self.on_event(kind, data)

    def run_started(self, run: RunRecord) -> None:
        self._add("run_started", run.run_id)

    def runner_log(self, run: RunRecord, line: str, level: str = "info") -> None:
        self._add("runner_log", (level, line))

    def task_started(self, run: RunRecord, task: TaskRecord) -> None:
        self._add("task_started", snapshot(task))

    def task_progress(self, run: RunRecord, task: TaskRecord) -> None:
        self._add("task_progress", snapshot(task))

    def task_output(self, run: RunRecord, task: TaskRecord | None, stream: str,
                    lines: list[str]) -> None:
        self._add("task_output", (task.index if task else None, stream, list(lines)))

    def task_retrying(self, run: RunRecord, task: TaskRecord) -> None:
        self._add("task_retrying", snapshot(task))

    def task_finished(self, run: RunRecord, task: TaskRecord) -> None:
        self._add("task_finished", snapshot(task))

    def run_finished(self, run: RunRecord) -> None:
        self._add("run_finished", run.state)

    # --- queries ---------------------------------------------------------------

    def of(self, kind: str) -> list[Any]:
        return [data for k, data in self.events if k == kind]

    def finished(self) -> list[TaskRecord]:
        return self.of("task_finished")

    def by_name(self, name: str) -> TaskRecord:
        (task,) = [t for t in self.finished() if t.name == name]
        return task

    def lines(self, index: int | None = -1, stream: str | None = None) -> list[str]:
        """Output lines of task `index` (None: the flow body; -1: everything)."""
        return [line for i, s, lines in self.of("task_output")
                if (index == -1 or i == index) and (stream is None or s == stream)
                for line in lines]

    def logs(self) -> list[str]:
        return [line for _, line in self.of("runner_log")]


def descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def host_pid(pid: int, under: int | None = None) -> int:
    """Our pid of a process below us (or below `under`) that calls itself `pid`.

    Inside the sandbox a task knows itself by its pid in the fork server's PID
    namespace; /proc/<ours>/status lists every pid it has, ours first and its own
    last. Without the sandbox the two are the same. Ask while the process lives.
    """
    root = psutil.Process(under) if under else psutil.Process()
    for process in root.children(recursive=True):
        try:
            with open(f"/proc/{process.pid}/status") as handle:
                line = next(ln for ln in handle if ln.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if int(line.split()[-1]) == pid:
            return process.pid
    raise LookupError(f"no process below us is pid {pid} in its namespace")


def pid_namespace(pid: int | str = "self") -> str:
    """The id of a process's PID namespace, e.g. "pid:[4026531836]"; "" if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def is_gone_in(namespace: str, pid: int) -> bool:
    """Whether the process that is `pid` in PID namespace `namespace` is gone.

    For pids a task reported from inside the sandbox: scans every process we see.
    """
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pid_namespace(entry) == namespace:
            try:
                with open(f"/proc/{entry}/status") as handle:
                    fields = dict(ln.split(":", 1) for ln in handle if ":" in ln)
            except OSError:
                continue
            if int(fields["NSpid"].split()[-1]) == pid and fields["State"].split()[0] != "Z":
                return False
    return True


def left_below(worker_pid: int) -> list[psutil.Process]:
    """What runs below a worker besides its fork server (and the server's init, which
    is pid 1 of the sandbox's namespace): empty when the worker is idle."""
    left = []
    for process in psutil.Process(worker_pid).children(recursive=True):
        try:
            server = "isolation.forkserver" in " ".join(process.cmdline())
            parent = process.ppid()
        except psutil.Error:
            continue
        if is_gone(process.pid):
            continue
        if server and (parent == worker_pid or pid_namespace(process.pid) != pid_namespace()
                       and _namespace_pid(process.pid) == 1):
            continue
        left.append(process)
    return left


def _namespace_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return int(next(ln for ln in handle if ln.startswith("NSpid:")).split()[-1])


def is_gone(pid: int) -> bool:
    """No such process, or only a zombie waiting to be reaped (nothing running)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if not is_gone(p.pid)]


@dataclasses.dataclass
class Ran:
    record: RunRecord
    events: Recorder
    executor: FlowExecutor

    def task(self, name: str) -> TaskRecord:
        return self.events.by_name(name)


# The sandbox mode of the executors `execute_flow` starts: PERFECT_SANDBOX=off runs
# those tests without the namespace. Every run covers both modes where it matters:
# test_sandbox.py and test_lifetime.py name the mode of each test.
SANDBOX = os.environ.get("PERFECT_SANDBOX", "auto")


def server_processes(executor: FlowExecutor) -> set[int]:
    """The fork server's pids: the server, and its init when it runs the sandbox."""
    server = executor.launcher.server_pid
    if server is None:
        return set()
    if executor.launcher.sandbox.mode != "namespace":
        return {server}
    try:
        return {server, *(p.pid for p in psutil.Process(server).children())}
    except psutil.NoSuchProcess:
        return {server}


def execute_flow(path: Path, flow: str, start_method: str = "forkserver",
                 options: RunOptions | None = None, listener: Recorder | None = None,
                 sandbox: str = SANDBOX) -> Ran:
    """Run one flow in this (control) process with a fresh executor, then check
    that only the fork server is left among our descendants, that close()
    leaves none at all, and that the flows module was never imported here.
    """
    before = {p.pid for p in descendants()}
    executor = FlowExecutor([str(path)], start_method, options, sandbox=sandbox)
    try:
        events = listener or Recorder()
        record = executor.new_run(flow, events).execute()
        server = server_processes(executor)
        left = [p for p in alive(descendants()) if p.pid not in server and p.pid not in before]
        assert left == [], f"processes outlived the run: {_explain(left)}"
    finally:
        executor.close()
    left = [p for p in alive(descendants()) if p.pid not in before]
    assert left == [], f"processes outlived executor.close(): {left}"
    assert Path(path).stem not in sys.modules, "the control process imported user code"
    return Ran(record, events, executor)


def _explain(processes: list[psutil.Process]) -> list[str]:
    """Who each leftover is: pid, parent, group, session, command line."""
    found = []
    for p in processes:
        try:
            found.append(f"{p.pid} ppid={p.ppid()} pgid={os.getpgid(p.pid)} "
                         f"sid={os.getsid(p.pid)} {p.status()} {' '.join(p.cmdline())[:120]}")
        except (psutil.Error, OSError):
            found.append(f"{p.pid} (gone)")
    return found


@pytest.fixture
def run_flow() -> Callable[..., Ran]:
    """run_flow(path, flow, start_method=..., options=..., listener=...) -> Ran."""
    return execute_flow


@dataclasses.dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path, timeout: float = 45,
            env: dict[str, str] | None = None) -> CliResult:
    """`python -m perfect_runner ARGS` as a subprocess, in `cwd`; `env` adds variables
    (PERFECT_* ones from the test's own environment are left out)."""
    extra = env or {}
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("PERFECT_")} | extra
    done = subprocess.run(
        [sys.executable, "-m", "perfect_runner", *args], cwd=cwd, env=env,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


# --- the worker against the fake backend --------------------------------------------


@pytest.fixture
def fake():
    """A fake Perfect backend on 127.0.0.1 (see fake_perfect.py), 2 s long-poll hold."""
    from fake_perfect import FakePerfect

    with FakePerfect(poll_hold=2.0) as server:
        yield server
