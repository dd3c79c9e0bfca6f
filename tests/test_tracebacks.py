"""A failed task's traceback, where a person looks: the terminal (its last frames live,
all of it in the summary), the log file, the JSON record and the backend's logs panel.
Chained causes stay; the runner's own frames are trimmed unless --full-tracebacks.

Real runs of `python -m perfect_runner`; the worker case runs against the fake backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from fake_perfect import FakePerfect

from perfect_runner.isolation.tracebacks import StackDumpFilter

RUNNER_NAMES = ("perfect_runner/isolation", "child_bootstrap", "forkserver", "task_child",
                "<frozen runpy>")

FLOWS = '''
import ctypes, os, time
from perfect_runner import task, flow

def parse_customer_row(row):
    return int(row)

def load_customer_rows():
    try:
        parse_customer_row("abc")
    except ValueError as exc:
        raise RuntimeError("customer file is corrupt") from exc

@task(crucial_pass=False)
def import_customers():
    load_customer_rows()

def tidy_up():
    raise KeyError("missing_column")

@task(crucial_pass=False)
def clean_orders():
    try:
        {}["orders"]
    except KeyError:
        tidy_up()  # raised while handling: implicit context

@task(crucial_pass=False, timeout=0.5)
def wait_for_warehouse():
    time.sleep(30)

@task(crucial_pass=False)
def read_native_buffer():
    ctypes.string_at(0)

@task(crucial_pass=False)
def abort_in_native_code():
    os.abort()

@flow(name="Customers")
def customers():
    import_customers()
    clean_orders()

@flow(name="Dumps")
def dumps():
    wait_for_warehouse()
    read_native_buffer()
    abort_in_native_code()
'''


@pytest.fixture
def flows(tmp_path: Path) -> Path:
    path = tmp_path / "customer_flows.py"
    path.write_text(FLOWS)
    return path


def run_local(tmp_path: Path, flows: Path, flow: str, *extra: str):
    result = run_cli("--flows", str(flows), "--run", flow, "--kill-grace", "0.5",
                     "--reports-dir", str(tmp_path / "reports"),
                     "--log-dir", str(tmp_path / "logs"), *extra, cwd=tmp_path)
    (record_path,) = (tmp_path / "reports").glob("*.json")
    (log_path,) = (tmp_path / "logs").glob("*.log")
    record = json.loads(record_path.read_text())
    return result, {t["name"]: t for t in record["tasks"]}, log_path.read_text()


def assert_no_runner_frames(text: str) -> None:
    for name in RUNNER_NAMES:
        assert name not in text, f"{name!r} in:\n{text}"


def summary_part(stdout: str) -> str:
    return stdout.split("Tracebacks of failed tasks:", 1)[1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_raised_traceback_in_terminal_log_and_record_with_chained_causes(flows, tmp_path,
                                                                          start_method):
    result, tasks, log = run_local(tmp_path, flows, "Customers", "--start-method", start_method)
    assert result.code == 0, result.stdout + result.stderr  # non-crucial failures only
    record_tb = tasks["import_customers"]["traceback"]
    # The user's frames, innermost last, the cause first, as Python prints it.
    for text in ("load_customer_rows", "parse_customer_row", "ValueError: invalid literal",
                 "The above exception was the direct cause of the following exception",
                 "RuntimeError: customer file is corrupt"):
        assert text in record_tb
        assert text in summary_part(result.stdout)
        assert text in log
    context = tasks["clean_orders"]["traceback"]
    assert "During handling of the above exception, another exception occurred" in context
    assert "tidy_up" in context and "KeyError: 'missing_column'" in context
    assert tasks["import_customers"]["note"] == "RuntimeError: customer file is corrupt"
    for text in (record_tb, context, result.stdout, log):
        assert_no_runner_frames(text)
    # Live: the last frames of the last exception; the cause waits for the summary.
    live = result.stdout.split("==> Customers: run", 2)[1]
    assert "#0 import_customers ! Traceback (last frames;" in live
    assert "#0 import_customers !     raise RuntimeError" in live
    # In the log once, as the task's stderr (not a second copy in a runner line).
    assert log.count("ERR RuntimeError: customer file is corrupt\n") == 1
    assert "#0 import_customers ERR   File" in log
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_full_tracebacks_keeps_the_runner_frames(flows, tmp_path):
    result, tasks, log = run_local(tmp_path, flows, "Customers", "--full-tracebacks")
    assert result.code == 0, result.stdout + result.stderr
    record_tb = tasks["import_customers"]["traceback"]
    assert "task_child.py" in record_tb and "load_customer_rows" in record_tb
    assert "task_child.py" in log


@pytest.mark.timeout(60)
def test_timeout_and_crash_dumps_show_the_task_frames_first(flows, tmp_path):
    result, tasks, log = run_local(tmp_path, flows, "Dumps")
    assert result.code == 0, result.stdout + result.stderr
    timeout, segv, abort = (tasks[n] for n in ("wait_for_warehouse", "read_native_buffer",
                                                "abort_in_native_code"))
    # Notes stay one readable line; the dump is the traceback.
    assert timeout["note"] in ("timed out after 0.5 s", "timed out after 0.5 s; killed "
                               "after grace")
    assert segv["note"] == "crashed: SIGSEGV (segmentation fault)"
    assert abort["note"] == "crashed: SIGABRT (aborted)"
    for task, func in ((timeout, "wait_for_warehouse"), (segv, "read_native_buffer"),
                       (abort, "abort_in_native_code")):
        dump = task["traceback"]
        frames = [line for line in dump.splitlines() if line.lstrip().startswith("File ")]
        assert func in frames[0] or func in frames[1], dump  # innermost first (ctypes first)
        assert_no_runner_frames(dump)
        assert "Extension modules" not in dump
        assert f" in {func}\n" in log
    for text in (result.stdout, log):
        assert_no_runner_frames(text)
        assert "Extension modules" not in text
    assert "  ____ #1 read_native_buffer ____" in summary_part(result.stdout)


@pytest.mark.timeout(60)
def test_backend_logs_panel_gets_the_traceback_as_task_stderr(flows, tmp_path):
    with FakePerfect(poll_hold=2.0) as fake:
        done = subprocess.run(
            [sys.executable, "-m", "perfect_runner", "--flows", str(flows), "--server",
             fake.url, "--run", "Customers", "--log-dir", str(tmp_path / "logs")],
            cwd=tmp_path, capture_output=True, text=True, timeout=50,
            env={k: v for k, v in os.environ.items() if not k.startswith("PERFECT_")},
        )
        assert done.returncode == 0, done.stderr
        (run_id,) = fake.runs
        logs = "\n".join(fake.logs(run_id))
    assert "[Task Output][stderr] import_customers:   File" in logs
    for text in ("load_customer_rows", "The above exception was the direct cause",
                 "RuntimeError: customer file is corrupt"):
        assert text in logs
    assert_no_runner_frames(logs)
    assert logs.count("[Task Output][stderr] import_customers: RuntimeError: customer file is "
                      "corrupt") == 1


def test_dump_filter_trims_runner_frames_across_batches_and_passes_other_lines():
    runner = f'  File "{Path(__file__).parent.parent}/perfect_runner/isolation/task_child.py"'
    lines = ["before", "Fatal Python error: Segmentation fault", "",
             "Current thread 0x00007f (most recent call first):",
             '  File "/home/me/flows.py", line 3 in crash_here', f"{runner}, line 100 in _execute",
             "", "Extension modules: psutil._psutil_linux (total: 1)", "after the dump"]
    dumps = StackDumpFilter()
    shown = dumps.feed(lines[:5]) + dumps.feed(lines[5:])
    assert shown == [*lines[:5], "", "after the dump"]
    assert dumps.text().splitlines() == [*lines[1:5]]
    assert StackDumpFilter(full=True).feed(lines) == lines


def test_dump_filter_keeps_only_the_end_of_an_endless_dump():
    dumps = StackDumpFilter()
    for _ in range(100):
        dumps.feed(["Thread 0x1 (most recent call first):",
                    *['  File "/x.py", line 1 in f'] * 999])
    assert len(dumps.dump) <= 1000 and len(dumps.text()) <= 20000


@pytest.mark.timeout(60)
def test_flow_body_traceback_is_trimmed_too(tmp_path):
    path = tmp_path / "body_flows.py"
    path.write_text("from perfect_runner import flow\n\ndef pick_region():\n"
                    "    raise LookupError('no region')\n\n@flow(name='Body')\ndef body():\n"
                    "    pick_region()\n")
    result = run_cli("--flows", str(path), "--run", "Body", "--log-dir", str(tmp_path / "logs"),
                     "--reports-dir", str(tmp_path / "reports"), cwd=tmp_path)
    assert result.code == 1
    (log,) = (tmp_path / "logs").glob("*.log")
    text = log.read_text()
    assert "in pick_region" in text and "LookupError: no region" in text
    assert_no_runner_frames(text)


HOSTILE = '''
from perfect_runner import task, flow

class Sneaky(Exception):
    def __str__(self):
        return "\\x1b]0;pwned\\x07\\x1b[2Jscreen wiped"

def recurse(n):
    return recurse(n + 1)

@task(crucial_pass=False)
def escape_codes():
    raise Sneaky()

@task(crucial_pass=False)
def too_deep():
    recurse(0)

@flow(name="Hostile")
def hostile():
    escape_codes()
    too_deep()
'''


@pytest.mark.timeout(60)
def test_hostile_tracebacks_cannot_drive_the_terminal_or_flood_it(tmp_path):
    path = tmp_path / "hostile_flows.py"
    path.write_text(HOSTILE)
    result, tasks, log = run_local(tmp_path, path, "Hostile")
    assert result.code == 0, result.stdout + result.stderr
    assert "\x1b" not in result.stdout and "screen wiped" in result.stdout
    deep = tasks["too_deep"]["traceback"]
    assert "RecursionError" in deep and "in recurse" in deep and len(deep) <= 20000
    # Live: a few lines; the summary: at most its cap, with a count of the rest.
    live = result.stdout.split("Tracebacks of failed tasks:")[0]
    assert sum("#1 too_deep !" in line for line in live.splitlines()) <= 8
    assert "RecursionError" in log
