"""Local mode through the real CLI: `python -m perfect_runner --flows X ...` as a
subprocess; exit codes, one-line usage errors, --list, report files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_cli

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) perfect_runner")

FLOWS = """
@task(estimated_time=1500)
def extract():
    \"\"\"Pull the rows\"\"\"
    print("extracting")
    return TaskResult(passed=True, note="3 rows", table=[{"row": 1, "ok": True}])


@task(estimated_time=200, crucial_pass=False)
def optional_check():
    raise RuntimeError("optional check broke")


@task
def publish(rows):
    return TaskResult(passed=True, note="published")


@task
def validate():
    return TaskResult(passed=False, note="schema mismatch")


@flow("Good Flow", description="Everything passes", tags={"team": "core"})
def good_flow():
    publish(extract())
    optional_check()


@flow("Bad Flow")
def bad_flow():
    extract()
    validate()
    publish(None)
"""


@pytest.fixture
def flows_file(write_flows) -> Path:
    return write_flows(FLOWS, name="local_flows")


def cli(tmp_path: Path, *args: str):
    return run_cli(*args, "--reports-dir", str(tmp_path / "reports"),
                   "--log-dir", str(tmp_path / "logs"), cwd=tmp_path)


def test_list_shows_flows_tags_and_tasks_in_call_order(flows_file: Path, tmp_path: Path) -> None:
    result = cli(tmp_path, "--flows", str(flows_file), "--list")
    assert result.code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Good Flow  [team=core]",
        "    Everything passes",
        "    - extract  ~1500 ms",
        "    - publish  ~1000 ms",
        "    - optional_check  ~200 ms  (non-crucial)",
        "Bad Flow",
        "    - extract  ~1500 ms",
        "    - validate  ~1000 ms",
        "    - publish  ~1000 ms",
    ]
    assert not (tmp_path / "reports").exists()


def test_run_all_completed_exits_0_and_writes_reports(flows_file: Path, tmp_path: Path) -> None:
    result = cli(tmp_path, "--flows", str(flows_file), "--run", "Good Flow")
    assert result.code == 0, result.stdout + result.stderr
    assert "Good Flow: COMPLETED" in result.stdout
    (json_path,) = (tmp_path / "reports").glob("Good_Flow_*.json")
    (html_path,) = (tmp_path / "reports").glob("Good_Flow_*.html")
    record = json.loads(json_path.read_text(encoding="utf-8"))
    assert record["flow_name"] == "Good Flow" and record["state"] == "COMPLETED"
    tasks = record["tasks"]
    assert [(t["index"], t["name"], t["state"]) for t in tasks] == [
        (0, "extract", "COMPLETED"), (1, "publish", "COMPLETED"),
        (2, "optional_check", "FAILED")]
    for key in ("index", "name", "state", "note", "table", "duration_ms", "peak_rss"):
        assert all(key in t for t in tasks), key
    assert tasks[0]["note"] == "3 rows" and tasks[0]["table"] == [{"row": 1, "ok": True}]
    assert tasks[2]["note"] == "RuntimeError: optional check broke"
    assert all(isinstance(t["duration_ms"], int) and t["peak_rss"] > 0 for t in tasks)
    html = html_path.read_text(encoding="utf-8")
    assert "Good Flow" in html and "optional check broke" in html
    assert list((tmp_path / "logs").glob("*.log"))


def test_a_crucial_failure_exits_1(flows_file: Path, tmp_path: Path) -> None:
    result = cli(tmp_path, "--flows", str(flows_file), "--run-all")
    assert result.code == 1, result.stdout + result.stderr
    assert "Good Flow: COMPLETED" in result.stdout
    assert "Bad Flow: FAILED" in result.stdout
    (json_path,) = (tmp_path / "reports").glob("Bad_Flow_*.json")
    record = json.loads(json_path.read_text(encoding="utf-8"))
    assert [(t["name"], t["state"], t["note"]) for t in record["tasks"]] == [
        ("extract", "COMPLETED", "3 rows"), ("validate", "FAILED", "schema mismatch")]


def one_line_error(result) -> str:
    assert result.code == 2, result.stdout + result.stderr
    # The runner's own log lines (e.g. a warning about running as root) may come first.
    lines = [line for line in result.stderr.strip().splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("perfect-runner: error: ")
    return lines[0]


def test_unknown_module_name(tmp_path: Path) -> None:
    line = one_line_error(cli(tmp_path, "--flows", "no_such_flows_module", "--run-all"))
    assert "no module named 'no_such_flows_module'" in line


def test_missing_module_file(tmp_path: Path) -> None:
    line = one_line_error(cli(tmp_path, "--flows", str(tmp_path / "absent.py"), "--list"))
    assert "absent.py" in line and "no such file" in line


def test_module_with_no_flows(write_flows, tmp_path: Path) -> None:
    path = write_flows("@task\ndef lonely():\n    pass\n", name="no_flows")
    line = one_line_error(cli(tmp_path, "--flows", str(path), "--run-all"))
    assert "no flows found in" in line and "no_flows.py" in line


def test_unknown_flow_name(flows_file: Path, tmp_path: Path) -> None:
    line = one_line_error(cli(tmp_path, "--flows", str(flows_file), "--run", "Nope"))
    assert "unknown flow 'Nope'" in line and "'Good Flow'" in line


def test_module_raising_at_import(write_flows, tmp_path: Path) -> None:
    path = write_flows("raise RuntimeError('config missing')\n", name="raises_at_import")
    line = one_line_error(cli(tmp_path, "--flows", str(path), "--run-all"))
    assert "raises_at_import.py" in line
    assert "RuntimeError: config missing" in line


def test_no_flows_option(tmp_path: Path) -> None:
    line = one_line_error(cli(tmp_path, "--run-all"))
    assert "no flows module given" in line


def test_max_result_size_option(write_flows, tmp_path: Path) -> None:
    path = write_flows("""
    @task
    def big():
        return b"x" * 3_000_000


    @flow("Big Result")
    def big_result():
        big()
    """, name="big_result")
    result = cli(tmp_path, "--flows", str(path), "--run-all", "--max-result-size", "1MiB")
    assert result.code == 1, result.stdout + result.stderr
    (json_path,) = (tmp_path / "reports").glob("Big_Result_*.json")
    (task,) = json.loads(json_path.read_text(encoding="utf-8"))["tasks"]
    assert task["note"] == ("result of task 'big' is 2.9 MiB, over the result size cap "
                            "of 1.0 MiB")
