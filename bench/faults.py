"""Fault handling: every fault of tests/test_faults.py in ONE flow run.

    python bench/faults.py [--quick]

One flow calls each faulty task (non-crucial) followed by a healthy task,
through one `FlowExecutor` (--max-procs 20, --kill-grace 0.5). A listener
takes timestamps: time to detection is task_started -> task_finished of the
faulty task; time to dead tree is task_started -> the moment every pid the
task wrote down (itself, forked children, a setsid grandchild) is gone, polled
from task_finished on. The control process's RSS is sampled at both events.
Every memory and fork fault caps itself.

Then the faults that kill a parent, each in a run of its own (they end their
run): a task that SIGKILLs its flow process, and one that SIGKILLs the fork
server. Measured: the run's duration (start to FAILED), the note, how long
until a fork server takes requests again, and the next run's state.
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import common
import psutil
from common import Row, mib, print_table, rss_bytes

from perfect_runner.executor.engine import FlowExecutor
from perfect_runner.executor.events import NullListener
from perfect_runner.executor.options import RunOptions
from perfect_runner.executor.records import RunRecord, TaskRecord
from perfect_runner.sdk.units import format_size

MARKER = "HEALTHY-MARKER"

# fault -> (@task options, body, expected state, expected note prefix)
FAULTS: dict[str, tuple[str, str, str, str]] = {
    "segfault": ("", "ctypes.string_at(0)", "FAILED", "crashed: SIGSEGV"),
    "abort": ("", "os.abort()", "FAILED", "crashed: SIGABRT"),
    "os._exit(3)": ("", "os._exit(3)", "FAILED", "exited with code 3"),
    "sys.exit(0)": ("", "sys.exit(0)", "FAILED", "called sys.exit(0)"),
    "self SIGKILL": ("", "os.kill(os.getpid(), signal.SIGKILL)", "FAILED", "crashed: SIGKILL"),
    "CPU loop, timeout=1": ("timeout=1", """
        while True:
            pass
    """, "FAILED", "timed out after 1.0 s"),
    "sleep, SIGTERM ignored": ("timeout=1", """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(1e9)
    """, "FAILED", "timed out after 1.0 s"),
    "swallows TaskTimeout": ("timeout=1", """
        while True:
            try:
                while True:
                    time.sleep(0.01)
            except BaseException:
                pass
    """, "FAILED", "timed out after 1.0 s; killed after grace"),
    "memory bomb 100MB": ("memory_limit='100MB'", """
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        chunks = []
        while len(chunks) < 60:  # self-capped at 600 MB
            chunks.append(b"x" * (10 * 1024 * 1024))
        time.sleep(60)
    """, "FAILED", "killed: memory limit"),
    "fork bomb, max-procs 20": ("", """
        children = 0
        while children < 60:  # self-capped
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                note_pid("fork bomb, max-procs 20")
                time.sleep(1000)
                os._exit(0)
            children += 1
        time.sleep(60)
    """, "FAILED", "killed: process limit exceeded"),
    "setsid grandchild": ("", """
        pid = os.fork()
        if pid == 0:
            os.setsid()
            if os.fork() == 0:
                note_pid("setsid grandchild")
                (TMP / "grandchild.ready").write_text("")
                time.sleep(1000)
            os._exit(0)
        os.waitpid(pid, 0)
        while not (TMP / "grandchild.ready").exists():
            time.sleep(0.005)
    """, "COMPLETED", ""),
    "output {mb} MB": ("", """
        block = "".join(f"{{i:049d}}\\n" for i in range(10_000))
        for _ in range({lines} // 10_000):
            sys.stdout.write(block)
        sys.stdout.flush()
    """, "COMPLETED", ""),
    "{mb} MB line, no newline": ("", """
        chunk = b"a" * (1024 * 1024)
        for _ in range({mb}):
            os.write(1, chunk)
    """, "COMPLETED", ""),
    "invalid UTF-8": ("", 'os.write(1, b"\\xff\\xfe bad \\xc3\\n")', "COMPLETED", ""),
    "close fd 1": ("", """
        os.close(1)
        print("after closing fd 1")
    """, "FAILED", "OSError: [Errno 9]"),
    "unpicklable result": ("", "return lambda: 1", "FAILED", "result of task"),
    "200 MiB result": ("", "return bytes(200 * 1024 * 1024)", "FAILED", "result of task"),
    "chained cause": ("", """
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise ValueError("outer") from exc
    """, "FAILED", "ValueError: outer"),
    "KeyboardInterrupt": ("", "raise KeyboardInterrupt", "FAILED", "interrupted: Keyboard"),
    "input()": ("", 'return input("name? ")', "FAILED", "EOFError"),
    "forged frame on fd 3": ("", """
        import struct
        header = b'{{"type": "progress", "percent": "abc"}}'
        os.write(3, struct.pack(">II", len(header), 0) + header)
        time.sleep(60)
    """, "FAILED", "broke the runner protocol: progress.percent"),
    "4 GiB prefix, blocked write": ("", """
        import socket
        import struct
        chan = socket.socket(fileno=os.dup(3))
        chan.sendall(struct.pack(">II", 2, 0xFFFFFFFF) + b"x" * (64 << 20))
    """, "FAILED", "broke the runner protocol: frame payload"),
}

HEADER = '''
import ctypes
import os
import signal
import sys
import time
from pathlib import Path

from perfect_runner import flow, task

TMP = Path({tmp!r})


def note_pid(fault):
    with open(TMP / "pids" / fault, "a") as out:
        out.write(f"{{os.getpid()}}\\n")


@task
def healthy():
    print("{marker}", flush=True)
'''


def _faults(quick: bool) -> dict[str, tuple[str, str, str, str]]:
    mb = 20 if quick else 100
    lines = mb * 1024 * 1024 // 50 // 10_000 * 10_000
    return {name.format(mb=mb): (opts, body.format(mb=mb, lines=lines), state, note)
            for name, (opts, body, state, note) in FAULTS.items()}


def flows_module(directory: Path, faults: dict[str, Any]) -> str:
    (directory / "pids").mkdir()
    parts = [HEADER.format(tmp=str(directory), marker=MARKER)]
    calls = []
    for number, (name, (opts, body, _, _)) in enumerate(faults.items()):
        options = "crucial_pass=False" + (f", {opts}" if opts else "")
        body = textwrap.indent(textwrap.dedent(body).strip(), "    ")
        parts.append(f"\n@task({options}, name={name!r})\ndef fault_{number}():\n"
                     f"    note_pid({name!r})\n{body}\n")
        calls += [f"    fault_{number}()", "    healthy()"]
    parts.append("\n@flow()\ndef all_faults():\n" + "\n".join(calls) + "\n")
    parts.append(PARENT_KILLERS)
    return common.write_module(directory, "fault_flows", "".join(parts))


PARENT_KILLERS = '''

@task(name="kill flow process")
def kill_flow_process(flow_pid):
    os.kill(flow_pid, signal.SIGKILL)
    time.sleep(60)  # stopped: its flow process is gone


@task(name="kill fork server")
def kill_fork_server():
    os.kill(os.getppid(), signal.SIGKILL)  # the fork server forked us
    time.sleep(60)  # we die with it


@flow(name="kill flow process")
def kill_flow_process_flow():
    kill_flow_process(os.getpid())


@flow(name="kill fork server")
def kill_fork_server_flow():
    kill_fork_server()


@flow(name="healthy after")
def healthy_after():
    healthy()
'''

# flow -> the start of its run's note
PARENT_FAULTS = {
    "kill flow process": "flow process killed by SIGKILL before the flow finished",
    "kill fork server": "the fork server died (killed by SIGKILL)",
}


def parent_kills(executor: FlowExecutor) -> list[Row]:
    """Each parent-killing flow in its own run, then a healthy run."""
    table, rows = [], []
    for flow, expected in PARENT_FAULTS.items():
        start = time.monotonic()
        record = executor.new_run(flow, NullListener()).execute()
        run_ms = (time.monotonic() - start) * 1000
        executor.launcher.wait_running(30.0)
        back_ms = (time.monotonic() - start) * 1000
        after = executor.new_run("healthy after", NullListener()).execute()
        ok = (record.state == "FAILED" and record.note.startswith(expected)
              and after.state == "COMPLETED")
        table.append([flow, f"{record.state} {record.note[:52]}", run_ms, back_ms, after.state,
                      "ok" if ok else "UNEXPECTED"])
        rows.append(Row(f"faults: {flow}", "run FAILED as / next run", f"{expected} / COMPLETED",
                        f"{record.note[:60]} ({run_ms:.0f} ms) / {after.state}", ok))
    print_table("Faults that kill a parent (each in its own run, then a healthy run)",
                ["fault", "run ended as", "run ms", "server up ms", "next run", "as expected"],
                table, align="llrrll")
    return rows


class Timing(NullListener):
    """Timestamps and control-process RSS at each task's start and finish."""

    def __init__(self, pid_dir: Path) -> None:
        self.pid_dir = pid_dir
        self.rows: dict[str, dict[str, Any]] = {}
        self.healthy: list[str] = []
        self.marker_lines = 0

    def task_started(self, run: RunRecord, task: TaskRecord) -> None:
        if task.name != "healthy":
            self.rows[task.name] = {"start": time.monotonic(), "rss_before": rss_bytes()}

    def task_output(self, run: RunRecord, task: TaskRecord | None, stream: str,
                    lines: list[str]) -> None:
        if task is not None and task.name == "healthy":
            self.marker_lines += lines.count(MARKER)

    def task_finished(self, run: RunRecord, task: TaskRecord) -> None:
        now = time.monotonic()
        if task.name == "healthy":
            self.healthy.append(task.state)
            return
        row = self.rows[task.name]
        row.update(finished=now, state=task.state, note=task.note, rss_after=rss_bytes())
        row["dead"] = self._dead_tree_at(task.name)

    def _dead_tree_at(self, fault: str) -> float | None:
        path = self.pid_dir / fault
        pids = [int(p) for p in path.read_text().split()] if path.exists() else []
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            if pids and all(_gone(p) for p in pids):
                return time.monotonic()
            time.sleep(0.001)
        return None


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def main(quick: bool = False) -> list[Row]:
    faults = _faults(quick)
    directory = common.work_dir("faults")
    module = flows_module(directory, faults)
    options = RunOptions(max_procs=20, kill_grace=0.5)
    # Without the sandbox: the tasks' pids are ours to check, and a task can kill the
    # fork server (in the sandbox it cannot; tests/test_sandbox.py shows that).
    executor = FlowExecutor([module], options=options, sandbox="off")
    listener = Timing(directory / "pids")
    rss_start = rss_bytes()
    try:
        record = executor.new_run("all_faults", listener).execute()
        server = executor.launcher.server_pid
        left = [p for p in psutil.Process().children(recursive=True)
                if p.pid != server and not _gone(p.pid)]
        parent_rows = parent_kills(executor)
    finally:
        executor.close()
    rss_end = rss_bytes()

    table, rows = [], []
    for name, (_, _, state, note) in faults.items():
        r = listener.rows[name]
        detect = (r["finished"] - r["start"]) * 1000
        dead = (r["dead"] - r["start"]) * 1000 if r.get("dead") else float("nan")
        detected = f"{r['state']} {r['note'][:48]}".rstrip()
        ok = r["state"] == state and r["note"].startswith(note)
        table.append([name, detected, detect, dead, mib(r["rss_before"]), mib(r["rss_after"]),
                      "ok" if ok else "UNEXPECTED"])
        rows.append(Row(f"faults: {name}", "detected as / ms", f"{state} {note}".strip(),
                        f"{detected} / {detect:.0f} ms", ok))
    print_table("Faults in one flow run (--max-procs 20, --kill-grace 0.5)",
                ["fault", "detected as", "detect ms", "dead tree ms", "RSS before MiB",
                 "RSS after MiB", "as expected"], table, align="llrrrrl")
    healthy_ok = (listener.healthy == ["COMPLETED"] * len(faults)
                  and listener.marker_lines == len(faults))
    rows += [
        Row("faults", "healthy task after each fault", "all COMPLETED",
            f"{listener.healthy.count('COMPLETED')}/{len(faults)}, "
            f"{listener.marker_lines} markers", healthy_ok),
        Row("faults", "run state / processes left", "COMPLETED / 0",
            f"{record.state} / {len(left)}", record.state == "COMPLETED" and not left),
        Row("faults", "control RSS start -> end", "-",
            f"{format_size(rss_start)} -> {format_size(rss_end)}", None),
    ]
    return rows + parent_rows


if __name__ == "__main__":
    common.print_rows(main("--quick" in sys.argv))
