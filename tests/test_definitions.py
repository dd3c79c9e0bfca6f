"""Flow and task definitions through the real CLI: what is refused at start (exit 2,
one line naming the definition), and flows files that share a file name.

Each test writes flows files into tmp_path and runs `python -m perfect_runner` (or
the worker against the fake backend) as a user would.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import run_cli
from worker_process import start_worker, stop_worker, worker_output

HEADER = "import sys\nfrom perfect_runner import TaskResult, flow, task\n"


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + textwrap.dedent(source), encoding="utf-8")
    return path


def cli(tmp_path: Path, *args: str):
    return run_cli(*args, "--reports-dir", str(tmp_path / "reports"),
                   "--log-dir", str(tmp_path / "logs"), cwd=tmp_path)


def usage_error(result) -> str:
    """The one line a usage error prints; fails unless it is exactly that."""
    assert result.code == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


# --- async and generator functions -------------------------------------------------

STYLES = {
    "async flow": ('@flow("Async")\nasync def body():\n    pass\n', "flow 'Async'",
                   "an 'async def' function"),
    "async task": ('@task\nasync def fetch():\n    pass\n\n@flow("F")\ndef f():\n    fetch()\n',
                   "task 'fetch'", "an 'async def' function"),
    "generator task": ('@task\ndef rows():\n    yield 1\n\n@flow("F")\ndef f():\n    rows()\n',
                       "task 'rows'", "a generator function"),
    "async generator flow": ('@flow("Agen")\nasync def agen():\n    yield 1\n',
                             "flow 'Agen'", "an async generator function"),
}


@pytest.mark.parametrize("style", list(STYLES))
def test_async_and_generator_definitions_are_refused_at_start(tmp_path: Path, style: str) -> None:
    source, who, what = STYLES[style]
    path = write(tmp_path / "styled.py", source)
    for args in (("--list",), ("--run-all",)):
        line = usage_error(cli(tmp_path, "--flows", str(path), *args))
        assert who in line and what in line and "styled.py:" in line, line
        assert "write it with plain 'def'" in line
    assert not (tmp_path / "reports").exists()


# --- duplicate flow names ----------------------------------------------------------


def test_two_flows_with_one_name_are_a_usage_error_naming_both(tmp_path: Path) -> None:
    a = write(tmp_path / "team_a" / "etl.py", '\n\n@flow("Nightly")\ndef nightly():\n    pass\n')
    b = write(tmp_path / "team_b" / "etl.py", '@flow("Nightly")\ndef other():\n    pass\n')
    line = usage_error(cli(tmp_path, "--flows", str(a), "--flows", str(b), "--list"))
    assert "two flows are named 'Nightly'" in line
    # Line numbers count the two header lines; a definition starts at its decorator.
    assert "team_a/etl.py:5" in line and "team_b/etl.py:3" in line, line


def test_same_name_twice_in_one_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "twice.py", '@flow("X")\ndef one():\n    pass\n\n'
                                        '@flow("X")\ndef two():\n    pass\n')
    line = usage_error(cli(tmp_path, "--flows", str(path), "--run-all"))
    assert "twice.py:3" in line and "twice.py:7" in line, line


def test_the_same_file_given_twice_is_loaded_once(tmp_path: Path) -> None:
    path = write(tmp_path / "once.py", '@flow("Once")\ndef once():\n    pass\n')
    result = cli(tmp_path, "--flows", str(path), "--flows", "once.py", "--list")
    assert result.code == 0, result.stderr
    assert result.stdout.splitlines() == ["Once"]


def test_one_file_given_as_module_and_as_path_says_so(tmp_path: Path) -> None:
    write(tmp_path / "pkg" / "__init__.py", "")
    write(tmp_path / "pkg" / "etl.py", '@flow("Etl")\ndef etl():\n    pass\n')
    line = usage_error(cli(tmp_path, "--flows", "pkg.etl", "--flows", "pkg/etl.py", "--list"))
    assert "flow 'Etl' at pkg/etl.py:3 was loaded twice, as module 'pkg.etl' and as 'etl'" in line


# --- two flows files with the same file name ---------------------------------------

TEAM = '''
@task
def which():
    print("code of {team}")
    return TaskResult(passed=True, note="{team} ran")


@flow("{team} flow")
def team_flow():
    which()
'''


def team_files(tmp_path: Path) -> list[Path]:
    return [write(tmp_path / team / "flows.py", TEAM.format(team=team))
            for team in ("team_a", "team_b")]


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_same_file_name_in_two_folders_runs_each_flows_own_code(tmp_path: Path,
                                                                start_method: str) -> None:
    a, b = team_files(tmp_path)
    result = cli(tmp_path, "--flows", str(a), "--flows", str(b), "--run-all",
                 "--start-method", start_method)
    assert result.code == 0, result.stdout + result.stderr
    for team in ("team_a", "team_b"):
        (log,) = [p for p in (tmp_path / "logs").glob("*.log")
                  if f"flow '{team} flow'" in p.read_text()]
        text = log.read_text()
        assert f"OUT code of {team}" in text and f"{team} ran" in text, text
        other = "team_b" if team == "team_a" else "team_a"
        assert f"code of {other}" not in text


def test_same_file_name_in_two_folders_via_the_worker(fake, tmp_path: Path) -> None:
    a, b = team_files(tmp_path)
    worker = start_worker(fake.url, a, tmp_path, "--flows", str(b))
    try:
        fake.wait_for(lambda: len(fake.flows) == 2, 15)
        for team in ("team_a", "team_b"):
            run_id = fake.trigger(f"{team} flow")
            fake.wait_for(lambda r=run_id: fake.run(r)["state"] in ("COMPLETED", "FAILED"), 20)
            run = fake.run(run_id)
            assert run["state"] == "COMPLETED", worker_output(tmp_path)
            assert run["tasks"][0]["result"]["note"] == f"{team} ran"
            assert f"[Task Output] which: code of {team}" in fake.logs(run_id)
    finally:
        stop_worker(worker)


def test_tasks_made_by_one_factory_each_run_their_own_code(tmp_path: Path) -> None:
    path = write(tmp_path / "factory.py", '''
    def make(n):
        @task(name=f"step{n}")
        def step():
            return TaskResult(passed=True, note=f"step {n} ran")
        return step

    first, second = make(1), make(2)


    @flow("Steps")
    def steps():
        first()
        second()
    ''')
    result = cli(tmp_path, "--flows", str(path), "--run-all")
    assert result.code == 0, result.stdout + result.stderr
    (log,) = (tmp_path / "logs").glob("*.log")
    text = log.read_text()
    assert "#0 step1 COMPLETED" in text and "step 1 ran" in text, text
    assert "#1 step2 COMPLETED" in text and "step 2 ran" in text, text


# --- names the worker would refuse -------------------------------------------------

REFUSED = {
    "long flow name": ('@flow("F" * 257)\ndef f():\n    pass\n',
                       "is 257 characters long (at most 256)"),
    "escape in flow name": ('@flow("red \\x1b[31m flow")\ndef f():\n    pass\n',
                            "contains control characters"),
    "newline in task name": ('@task(name="two\\nlines")\ndef t():\n    pass\n\n'
                             '@flow("F")\ndef f():\n    t()\n', "contains control characters"),
    "10,000-character flow name": ('@flow("n" * 10_000)\ndef f():\n    pass\n',
                                   "is 10000 characters long (at most 256)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_names_the_worker_would_refuse_are_refused_at_start(tmp_path: Path, case: str) -> None:
    source, problem = REFUSED[case]
    path = write(tmp_path / "named.py", source)
    line = usage_error(cli(tmp_path, "--flows", str(path), "--list"))
    assert problem in line and "named.py:" in line, line
    assert "\x1b" not in line and len(line) < 500, line


def test_the_worker_registers_nothing_when_a_name_would_be_refused(fake, tmp_path: Path):
    path = write(tmp_path / "named.py", '@flow("ok")\ndef ok():\n    pass\n\n'
                                        '@flow("x" * 300)\ndef long():\n    pass\n')
    worker = start_worker(fake.url, path, tmp_path)
    try:
        assert worker.wait(30) == 2
    finally:
        stop_worker(worker)
    assert "is 300 characters long (at most 256)" in worker_output(tmp_path)
    assert fake.flows == [] and fake.requests_to("/api/flows") == []


# --- the flows description the fork server sends ------------------------------------


def test_a_flows_module_that_garbles_the_description_is_refused_in_one_line(
        tmp_path: Path) -> None:
    """The description comes from the child that imported user code: a module that
    rewrites the loader's output gets one line naming the bad field, no traceback."""
    path = write(tmp_path / "garbles.py", '''
        from perfect_runner.sdk.registry import TaskDefinition

        _options = TaskDefinition.options
        TaskDefinition.options = lambda self: {**_options(self), "crucial_pass": "yes"}

        @task
        def step():
            return TaskResult(passed=True)

        @flow("Garbled")
        def garbled():
            step()
        ''')
    for args in (("--list",), ("--run-all",)):
        line = usage_error(cli(tmp_path, "--flows", str(path), *args))
        assert "described them wrongly" in line, line
        assert "'crucial_pass' is 'yes', not true or false" in line, line
    assert not (tmp_path / "reports").exists()
