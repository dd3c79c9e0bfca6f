"""The small things a user notices on the command line: --version, --help's
placeholders, the root warning's place, retried notes, sizes in the unit written,
a syntax error in a flows module."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import run_cli

from perfect_runner import __version__
from perfect_runner.sdk.units import format_limit, format_size

ROOT_WARNING = "running as root: tasks run as root too"


def cli(tmp_path: Path, *args: str):
    return run_cli(*args, "--reports-dir", str(tmp_path / "reports"),
                   "--log-dir", str(tmp_path / "logs"), cwd=tmp_path)


def flows(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "small_flows.py"
    path.write_text("from perfect_runner import task, flow\n" + source)
    return path


def test_version(tmp_path):
    result = run_cli("--version", cwd=tmp_path)
    assert (result.code, result.stdout.strip()) == (0, f"perfect-runner {__version__}")


def test_help_placeholders_are_uniform(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.code == 0
    usage = result.stdout.split("\n\n", 1)[0]
    placeholders = set(re.findall(r"\[--[a-z-]+ ([^\]]+)\]", usage))
    words = {p for p in placeholders if not p.startswith("{")}  # choices are listed
    assert words <= {"MODULE", "FLOW", "URL", "N", "SECONDS", "TOKEN", "PATH", "SIZE", "NAME",
                     "PATTERN", "KEY=VALUE", "DIR"}, words
    assert "--full-tracebacks" in result.stdout and "--version" in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the warning is for a worker running as root")
def test_root_warning_once_after_usage_checks(tmp_path):
    path = flows(tmp_path, "@task\ndef hello():\n    pass\n@flow(name='Hi')\ndef hi():\n"
                           "    hello()\n")
    bad = cli(tmp_path, "--flows", str(path), "--run", "Nope")
    assert bad.code == 2 and ROOT_WARNING not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]  # one line
    good = cli(tmp_path, "--flows", str(path), "--run", "Hi")
    assert good.code == 0 and good.stderr.count(ROOT_WARNING) == 1


def test_retried_attempt_note_is_not_doubled(tmp_path):
    path = flows(tmp_path, "@task(retries=1)\ndef flaky():\n    raise OSError('disk busy')\n"
                           "@flow(name='Retry')\ndef f():\n    flaky()\n")
    result = cli(tmp_path, "--flows", str(path), "--run", "Retry")
    assert result.code == 1
    (log,) = (tmp_path / "logs").glob("*.log")
    for text in (result.stdout, log.read_text()):
        assert "attempt 1 failed: OSError: disk busy" in text
        assert "attempt 1 failed: attempt 1 failed" not in text
        assert "retrying after attempt 1 failed: attempt" not in text


@pytest.mark.timeout(30)
def test_memory_limit_is_shown_in_the_unit_written(tmp_path):
    path = flows(tmp_path, "import time\n@task(memory_limit='20MB')\ndef hog():\n"
                           "    data = b'x' * 80_000_000\n    time.sleep(20)\n"
                           "@flow(name='Hog')\ndef f():\n    hog()\n")
    result = cli(tmp_path, "--flows", str(path), "--run", "Hog")
    assert result.code == 1
    (record,) = (tmp_path / "reports").glob("*.json")
    note = json.loads(record.read_text())["tasks"][0]["note"]
    assert re.fullmatch(r"killed: memory limit 20 MB exceeded \(RSS \d+ MB\)", note), note


def test_size_formats():
    assert [format_limit(v) for v in (200_000_000, 512 * 1024**2, 10**9, 1024**3)] == [
        "200 MB", "512 MiB", "1.0 GB", "1.0 GiB"]
    assert format_size(215_000_000, decimal=True) == "215 MB"


def test_syntax_error_in_flows_module_is_one_line(tmp_path):
    path = tmp_path / "broken_flows.py"
    path.write_text("from perfect_runner import flow\n\ndef broken(:\n    pass\n")
    result = cli(tmp_path, "--flows", str(path), "--run-all")
    assert result.code == 2
    assert result.stderr.strip() == (f"perfect-runner: error: cannot import flows module "
                                     f"{str(path)!r}: SyntaxError at {path}:3: invalid syntax")
