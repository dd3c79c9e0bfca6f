"""Fault injection: every way a task can misbehave, each followed by a healthy task.

One flows module (module-scoped) holds one flow per fault: the faulty task is
non-crucial, then `healthy` prints a marker. Each case runs in-process through
`FlowExecutor` (conftest's `execute_flow`, which also checks that no process
outlives the run or the executor) and asserts the faulty task's exact state
and note, that the healthy task COMPLETED and printed its marker, and what is
specific to the fault (log file contents, a setsid grandchild's pid gone).
Two cases also run through the CLI, so --kill-grace and --max-procs are seen
to reach the supervisor.
Every memory and fork test caps itself, so a runner bug cannot hurt the host.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    HEADER,
    Recorder,
    alive,
    descendants,
    execute_flow,
    is_gone_in,
    run_cli,
)

from perfect_runner.executor.options import RunOptions
from perfect_runner.executor.records import RunRecord, TaskRecord
from perfect_runner.isolation.lines import CONTINUED
from perfect_runner.local.logfile import LogFileListener

MARKER = "HEALTHY-MARKER-7f3a"
OUTPUT_LINES = 2_000_000  # 50 bytes each: 100 MB
LONG_LINE = 100 * 1024 * 1024  # bytes without a newline

# fault name -> (@task options, body). Each becomes a task `fault_<name>` and a
# flow `flow_<name>` calling it (non-crucial), then `healthy()`.
FAULTS: dict[str, tuple[str, str]] = {
    "segfault": ("", "ctypes.string_at(0)"),
    "abort": ("", "os.abort()"),
    "exit3": ("", "os._exit(3)"),
    "sys_exit0": ("", "sys.exit(0)"),
    "self_sigkill": ("", "os.kill(os.getpid(), signal.SIGKILL)"),
    "cpu_loop": ("timeout=1", """
        n = 0
        while True:
            n += 1
    """),
    "sleep_ignoring_sigterm": ("timeout=1", """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(1e9)
    """),
    "swallow_timeout": ("timeout=1", """
        while True:
            try:
                while True:
                    time.sleep(0.01)
            except BaseException:  # the TaskTimeout too: keep running
                pass
    """),
    "memory_bomb": ("memory_limit='100MB'", """
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # extra cap: 1 GiB
        chunks = []
        while len(chunks) < 60:  # stop by itself at 600 MB
            chunks.append(b"x" * (10 * 1024 * 1024))  # touched: really resident
        print("MEMORY-BOMB-CAPPED", flush=True)
        time.sleep(60)
    """),
    "fork_bomb": ("", """
        children = 0
        while children < 60:  # capped: never unbounded
            try:
                pid = os.fork()
            except OSError:
                break  # RLIMIT_NPROC said no
            if pid == 0:
                time.sleep(1000)
                os._exit(0)
            children += 1
        print("FORK-BOMB-CAPPED", children, flush=True)
        time.sleep(60)
    """),
    "setsid_grandchild": ("", """
        pid = os.fork()
        if pid == 0:
            os.setsid()
            if os.fork() == 0:
                (TMP / "grandchild.tmp").write_text(
                    f"{os.getpid()} {os.readlink('/proc/self/ns/pid')}")
                os.rename(TMP / "grandchild.tmp", TMP / "grandchild.pid")
                time.sleep(1000)
            os._exit(0)
        os.waitpid(pid, 0)
        wait_for_file(TMP / "grandchild.pid")
        return "left a grandchild"
    """),
    "output_flood": ("", f"""
        block = "".join(f"{{i:049d}}\\n" for i in range(10_000))
        for _ in range({OUTPUT_LINES} // 10_000):
            sys.stdout.write(block)
        sys.stdout.flush()
    """),
    "long_line": ("", f"""
        chunk = b"a" * (1024 * 1024)
        for _ in range({LONG_LINE} // len(chunk)):
            os.write(1, chunk)
    """),
    "invalid_utf8": ("", 'os.write(1, b"\\xff\\xfe bad \\xc3\\n")'),
    "close_stdout": ("", """
        os.close(1)
        print("after closing fd 1")
        return "survived"
    """),
    "unpicklable": ("", "return lambda: 1"),
    "huge_result": ("", "return bytes(200 * 1024 * 1024)"),
    "chained_cause": ("", """
        try:
            raise KeyError("inner cause")
        except KeyError as exc:
            raise ValueError("outer failure") from exc
    """),
    "keyboard_interrupt": ("", "raise KeyboardInterrupt"),
    "input_blocks": ("", 'return input("name? ")'),
}


def flows_source() -> str:
    parts = [f'''
@task
def healthy():
    print("{MARKER}", flush=True)
    return "fine"


@task(crucial_pass=True)
def crucial_chained():
    try:
        raise KeyError("inner cause")
    except KeyError as exc:
        raise ValueError("outer failure") from exc


@flow()
def flow_crucial_chained():
    try:
        crucial_chained()
    except ValueError as exc:
        (TMP / "cause.txt").write_text(f"{{type(exc.__cause__).__name__}}: {{exc.__cause__}}")
        raise
''']
    for name, (options, body) in FAULTS.items():
        opts = f"crucial_pass=False{', ' + options if options else ''}"
        parts.append(f"""
@task({opts})
def fault_{name}():
{textwrap.indent(textwrap.dedent(body).strip(), "    ")}


@flow()
def flow_{name}():
    fault_{name}()
    healthy()
""")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def fault_flows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("faults")
    path = tmp / "fault_flows.py"
    path.write_text(HEADER.format(tmp=str(tmp)) + flows_source(), encoding="utf-8")
    return path


class FaultRecorder(Recorder):
    """Records events, but only counts output lines (a flood would fill memory),
    keeping the few that matter; also writes the run's local log file."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        # Above the flood's ~180 MB of log: every line must reach the file (the bound
        # itself is tested in test_log_bound.py).
        self.log = LogFileListener(log_dir, max_bytes=1 << 30)
        self.line_count: dict[int | None, int] = {}
        self.kept: list[tuple[int | None, str]] = []

    def run_started(self, run: RunRecord) -> None:
        self.log.run_started(run)
        super().run_started(run)

    def task_output(self, run: RunRecord, task: TaskRecord | None, stream: str,
                    lines: list[str]) -> None:
        self.log.task_output(run, task, stream, lines)
        index = task.index if task else None
        self.line_count[index] = self.line_count.get(index, 0) + len(lines)
        self.kept.extend((index, line) for line in lines[:5] if len(line) < 200)

    def task_started(self, run: RunRecord, task: TaskRecord) -> None:
        self.log.task_started(run, task)
        super().task_started(run, task)

    def task_finished(self, run: RunRecord, task: TaskRecord) -> None:
        self.log.task_finished(run, task)
        super().task_finished(run, task)

    def runner_log(self, run: RunRecord, line: str, level: str = "info") -> None:
        self.log.runner_log(run, line, level)
        super().runner_log(run, line, level)

    def run_finished(self, run: RunRecord) -> None:
        self.log.run_finished(run)
        super().run_finished(run)

    def texts(self, index: int | None) -> list[str]:
        return [line for i, line in self.kept if i == index]


def run_fault(fault_flows: Path, tmp_path: Path, name: str, **options: Any) -> tuple[
        TaskRecord, FaultRecorder, RunRecord]:
    """Run flow_<name>; check the healthy task after it; return the faulty task's record."""
    options.setdefault("kill_grace", 0.5)
    events = FaultRecorder(tmp_path / "logs")
    ran = execute_flow(fault_flows, f"flow_{name}", options=RunOptions(**options),
                       listener=events)
    faulty, healthy = ran.task(f"fault_{name}"), ran.task("healthy")
    assert (faulty.index, healthy.index) == (0, 1)
    assert healthy.state == "COMPLETED" and healthy.note == "", healthy
    assert events.texts(1) == [MARKER]
    assert ran.record.state == "COMPLETED"  # a non-crucial failure is a warning
    return faulty, events, ran.record


def log_lines(record: RunRecord) -> list[str]:
    assert record.log_path
    return Path(record.log_path).read_text(encoding="utf-8").splitlines()


# fault -> (state, note prefix): the note text comes from outcome.py / task_child.py.
EXPECTED: dict[str, tuple[str, str]] = {
    "segfault": ("FAILED", "crashed: SIGSEGV (segmentation fault)"),
    "abort": ("FAILED", "crashed: SIGABRT (aborted)"),
    "exit3": ("FAILED", "exited with code 3 before returning a result"),
    "sys_exit0": ("FAILED", "called sys.exit(0) before returning a result"),
    "self_sigkill": ("FAILED", "crashed: SIGKILL (killed)"),
    "chained_cause": ("FAILED", "ValueError: outer failure"),
    "keyboard_interrupt": ("FAILED", "interrupted: KeyboardInterrupt raised inside the task"),
    "input_blocks": ("FAILED", "EOFError"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_child_death_and_exceptions(fault_flows: Path, tmp_path: Path, name: str) -> None:
    faulty, _, _ = run_fault(fault_flows, tmp_path, name)
    state, note = EXPECTED[name]
    assert faulty.state == state
    assert faulty.note.startswith(note), faulty.note
    if name in ("exit3", "sys_exit0", "chained_cause", "keyboard_interrupt"):
        assert "; last stderr" not in faulty.note
        assert faulty.note == note
    if name == "input_blocks":
        assert faulty.duration_ms is not None and faulty.duration_ms < 5000


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name,note", [
    ("cpu_loop", "timed out after 1.0 s"),
    ("sleep_ignoring_sigterm", "timed out after 1.0 s"),
    ("swallow_timeout", "timed out after 1.0 s; killed after grace"),
])
def test_timeouts(fault_flows: Path, tmp_path: Path, name: str, note: str) -> None:
    faulty, _, _ = run_fault(fault_flows, tmp_path, name)
    assert (faulty.state, faulty.note) == ("FAILED", note)
    # stopped near the deadline: 1 s, plus the 0.5 s grace when it had to be killed
    assert 1000 <= (faulty.duration_ms or 0) < 5000


@pytest.mark.timeout(30)
def test_memory_bomb(fault_flows: Path, tmp_path: Path) -> None:
    faulty, _, _ = run_fault(fault_flows, tmp_path, "memory_bomb")
    assert faulty.state == "FAILED"
    assert faulty.note.startswith("killed: memory limit 100 MB exceeded (RSS "), faulty.note
    assert faulty.peak_rss and faulty.peak_rss > 100_000_000


@pytest.mark.timeout(30)
def test_fork_bomb(fault_flows: Path, tmp_path: Path) -> None:
    faulty, _, _ = run_fault(fault_flows, tmp_path, "fork_bomb", max_procs=20)
    assert faulty.state == "FAILED"
    assert faulty.note.startswith("killed: process limit exceeded ("), faulty.note
    assert faulty.note.endswith(" processes, --max-procs 20)"), faulty.note


@pytest.mark.timeout(30)
def test_setsid_grandchild_dies_with_its_task(fault_flows: Path, tmp_path: Path) -> None:
    pid_file = fault_flows.parent / "grandchild.pid"
    pid_file.unlink(missing_ok=True)
    faulty, _, _ = run_fault(fault_flows, tmp_path, "setsid_grandchild")
    assert (faulty.state, faulty.note) == ("COMPLETED", "")
    pid, namespace = pid_file.read_text().split()
    assert is_gone_in(namespace, int(pid)), pid


@pytest.mark.timeout(40)
def test_output_flood_reaches_the_log_file(fault_flows: Path, tmp_path: Path) -> None:
    faulty, events, record = run_fault(fault_flows, tmp_path, "output_flood")
    assert (faulty.state, faulty.note) == ("COMPLETED", "")
    assert events.line_count[0] == OUTPUT_LINES
    flood = [line for line in log_lines(record) if " #0 fault_output_flood OUT " in line]
    assert len(flood) == OUTPUT_LINES
    assert flood[0].endswith(f" {0:049d}") and flood[-1].endswith(f" {9999:049d}")
    assert any(f"#1 healthy OUT {MARKER}" in line for line in log_lines(record))


@pytest.mark.timeout(30)
def test_long_line_is_cut_into_marked_pieces(fault_flows: Path, tmp_path: Path) -> None:
    faulty, events, record = run_fault(fault_flows, tmp_path, "long_line")
    assert (faulty.state, faulty.note) == ("COMPLETED", "")
    pieces = [line for line in log_lines(record) if " #0 fault_long_line OUT " in line]
    marked = [p for p in pieces if p.endswith(CONTINUED)]
    piece = 64 * 1024
    assert len(pieces) == LONG_LINE // piece
    assert len(marked) == len(pieces) - 1 and not pieces[-1].endswith(CONTINUED)
    assert all(p.endswith(" " + "a" * piece + CONTINUED) for p in marked)
    assert pieces[-1].endswith(" " + "a" * piece)


@pytest.mark.timeout(30)
def test_invalid_utf8_becomes_replacement_characters(fault_flows: Path,
                                                     tmp_path: Path) -> None:
    faulty, events, record = run_fault(fault_flows, tmp_path, "invalid_utf8")
    assert faulty.state == "COMPLETED"
    assert events.texts(0) == ["\ufffd\ufffd bad \ufffd"]
    assert any(line.endswith(" #0 fault_invalid_utf8 OUT \ufffd\ufffd bad \ufffd")
               for line in log_lines(record))


@pytest.mark.timeout(30)
def test_closing_stdout(fault_flows: Path, tmp_path: Path) -> None:
    faulty, events, _ = run_fault(fault_flows, tmp_path, "close_stdout")
    # print() onto the closed fd 1 raises inside the task: an ordinary task failure.
    assert faulty.state == "FAILED"
    assert faulty.note == "OSError: [Errno 9] Bad file descriptor", faulty.note


@pytest.mark.timeout(30)
def test_unpicklable_result(fault_flows: Path, tmp_path: Path) -> None:
    faulty, _, _ = run_fault(fault_flows, tmp_path, "unpicklable")
    assert faulty.state == "FAILED"
    assert faulty.note.startswith(
        "result of task 'fault_unpicklable' could not be pickled: function ("), faulty.note


@pytest.mark.timeout(30)
def test_result_over_the_size_cap(fault_flows: Path, tmp_path: Path) -> None:
    faulty, _, _ = run_fault(fault_flows, tmp_path, "huge_result")
    assert (faulty.state, faulty.note) == (
        "FAILED", "result of task 'fault_huge_result' is 200 MiB, over the result size "
        "cap of 64 MiB")


@pytest.mark.timeout(30)
def test_crucial_chained_exception_reaches_the_flow_body_with_its_cause(
        fault_flows: Path, tmp_path: Path) -> None:
    cause = fault_flows.parent / "cause.txt"
    cause.unlink(missing_ok=True)
    ran = execute_flow(fault_flows, "flow_crucial_chained", listener=Recorder())
    task = ran.task("crucial_chained")
    assert (task.state, task.note) == ("FAILED", "ValueError: outer failure")
    assert ran.record.state == "FAILED"
    assert cause.read_text() == "KeyError: 'inner cause'"


def test_every_fault_has_a_test() -> None:
    tested: set[str] = set(EXPECTED) | {
        "cpu_loop", "sleep_ignoring_sigterm", "swallow_timeout", "memory_bomb", "fork_bomb",
        "setsid_grandchild", "output_flood", "long_line", "invalid_utf8", "close_stdout",
        "unpicklable", "huge_result"}
    assert tested == set(FAULTS)




@pytest.mark.timeout(40)
@pytest.mark.parametrize("name,args,note", [
    ("swallow_timeout", ["--kill-grace", "0.5"], "timed out after 1.0 s; killed after grace"),
    ("fork_bomb", ["--max-procs", "20"], "killed: process limit exceeded ("),
])
def test_cli_options_reach_the_supervisor(fault_flows: Path, tmp_path: Path, name: str,
                                          args: list[str], note: str) -> None:
    before = {p.pid for p in descendants()}
    done = run_cli("--flows", str(fault_flows), "--run", f"flow_{name}",
                   "--reports-dir", str(tmp_path / "reports"), "--log-dir",
                   str(tmp_path / "logs"), *args, cwd=tmp_path)
    assert done.code == 0, done.stderr
    assert alive([p for p in descendants() if p.pid not in before]) == []
    (log,) = (tmp_path / "logs").glob("*.log")
    text = log.read_text(encoding="utf-8")
    assert f"#0 fault_{name} FAILED in " in text and f": {note}" in text
    assert f"#1 healthy OUT {MARKER}" in text and "#1 healthy COMPLETED in " in text
