"""The run log file is bounded (--max-log-file-size): a task flooding its output leaves
a file under the limit that keeps the start and the end of the run and ends with a line
saying how much was cut. Real CLI and worker; the file class itself with plain bytes."""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

from conftest import run_cli
from worker_process import start_worker, stop_worker, worker_output

from perfect_runner.local.bounded_file import NOTICE_RESERVE, BoundedLogFile

LINES = 200_000
TEXT = "x" * 90
FLOOD = f'''
import sys
from perfect_runner import flow, task


@task
def flood():
    write = sys.stdout.write
    for i in range({LINES}):
        write(f"{{i:08d}} {TEXT}\\n")
    print("THE END OF THE FLOOD")


@flow("Flood")
def flood_flow():
    flood()
'''
CUT = re.compile(r" runner WARN  log file cut: (\d+) bytes \((\d+) lines\) left out between "
                 r"the first .+ and the last .+ \(--max-log-file-size 64 KiB\)$")
OUT = re.compile(r"^\S+ #0 flood OUT (\d{8}) x+$")


def flood_module(tmp_path: Path) -> Path:
    path = tmp_path / "flood.py"
    path.write_text(textwrap.dedent(FLOOD), encoding="utf-8")
    return path


def check_bounded(log: Path) -> None:
    """Under 64 KiB, start and end of the run kept, and the cut counted exactly."""
    data = log.read_bytes()
    assert len(data) <= 64 * 1024
    lines = data.decode().splitlines()
    assert " runner INFO  run " in lines[0] and "of flow 'Flood' started" in lines[0]
    assert any("log file limit reached (--max-log-file-size 64 KiB)" in line for line in lines)
    assert lines[-2].endswith("COMPLETED") and " runner INFO  run " in lines[-2]
    assert any(line.endswith("OUT THE END OF THE FLOOD") for line in lines)
    cut = CUT.search(lines[-1])
    assert cut, lines[-1]
    kept = [OUT.match(line) for line in lines]
    kept = [m for m in kept if m]
    # Every flood line is either in the file or counted as cut; cut bytes add up too
    # (every OUT line has the same length: fixed-width timestamp, index and text).
    assert len(kept) + int(cut.group(2)) == LINES
    line_bytes = len(kept[0].group(0)) + 1
    assert int(cut.group(1)) == (LINES - len(kept)) * line_bytes
    numbers = [int(m.group(1)) for m in kept]
    assert numbers[0] == 0 and numbers[-1] == LINES - 1  # the head and the tail


def test_flooding_task_leaves_a_bounded_log_ending_with_the_cut(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_cli("--flows", str(flood_module(tmp_path)), "--run-all",
                     "--max-log-file-size", "64KiB", "--log-dir", str(tmp_path / "logs"),
                     "--reports-dir", str(tmp_path / "reports"), cwd=tmp_path)
    took = time.monotonic() - started
    assert result.code == 0, result.stdout + result.stderr
    (log,) = (tmp_path / "logs").glob("*.log")
    check_bounded(log)
    print(f"{LINES} lines ({LINES * 100 / 1e6:.0f} MB) through a 64 KiB log in {took:.1f} s")


def test_the_worker_log_file_is_bounded_too(fake, tmp_path: Path) -> None:
    worker = start_worker(fake.url, flood_module(tmp_path), tmp_path,
                          "--max-log-file-size", "64KiB", "--max-log-entries", "50")
    try:
        fake.wait_for(lambda: len(fake.flows) == 1, 15)
        run_id = fake.trigger("Flood")
        fake.wait_for(lambda: fake.run(run_id)["state"] == "COMPLETED", 30)
        fake.wait_for(lambda: "flow 'Flood' COMPLETED" in worker_output(tmp_path), 10)
    finally:
        stop_worker(worker)
    check_bounded(tmp_path / "logs" / f"{run_id}.log")


# --- the file itself -------------------------------------------------------------


def notice(text: str) -> bytes:
    return f"NOTICE {text}\n".encode()


def test_under_the_limit_nothing_is_cut_or_added(tmp_path: Path) -> None:
    log = BoundedLogFile(tmp_path / "a.log", 16 * 1024, notice)
    log.write(b"one\ntwo\n")
    log.close()
    assert (tmp_path / "a.log").read_bytes() == b"one\ntwo\n"


def test_a_line_longer_than_the_tail_keeps_its_end(tmp_path: Path) -> None:
    limit = 16 * 1024
    log = BoundedLogFile(tmp_path / "b.log", limit, notice)
    log.write(b"first line\n")
    log.write(b"a" * 100_000 + b"b" * 100 + b"\n")
    log.close()
    data = (tmp_path / "b.log").read_bytes()
    assert len(data) <= limit
    head, limit_notice, tail, cut_notice, end = data.split(b"\n", 4)
    assert head == b"first line" and limit_notice.startswith(b"NOTICE log file limit")
    assert tail.endswith(b"b" * 100) and set(tail) <= {ord("a"), ord("b")}
    assert cut_notice.startswith(b"NOTICE log file cut: ") and end == b""
    cut_bytes = int(cut_notice.split(b" ")[4])
    assert cut_bytes + len(tail) == 100_100  # exactly what is missing of that line


def test_notices_fit_the_reserve_and_the_limit_holds(tmp_path: Path) -> None:
    limit = 16 * 1024
    log = BoundedLogFile(tmp_path / "c.log", limit, lambda text: notice(text * 50))
    for i in range(10_000):
        log.write(f"{i:06d} {'y' * 37}\n".encode())
    log.close()
    data = (tmp_path / "c.log").read_bytes()
    assert len(data) <= limit
    assert data.endswith(b"\n") and data.count(b"NOTICE") == 2
    notices = [line for line in data.split(b"\n") if line.startswith(b"NOTICE")]
    assert len(notices) == 2 and all(len(n) < NOTICE_RESERVE // 2 for n in notices)
