"""What user code names and says, shown safely: terminal, --list, the final line, the
worker's own log, and the file names of reports and logs. Real CLI, real worker."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

from conftest import run_cli
from worker_process import start_worker, stop_worker, worker_output

HEADER = "import sys\nfrom perfect_runner import TaskResult, flow, task\n"
# Anything a terminal would act on: escapes, controls other than newline, bidi overrides.
DRIVES_TERMINAL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
FORGED = "2030-01-01 00:00:00,000 INFO perfect_runner.worker: forged entry"

HOSTILE = r'''
@task(description="\x1b]0;retitled\x07describes")
def noisy():
    print("\x1b[2J\x1b[Hcleared \x1b]0;title\x07screen \x1b[31mred\x1b[0m")
    print("bidi \u202eevil\u202c end", file=sys.stderr)
    return TaskResult(passed=False, note="bad \x1b[5mnote\x1b[0m\n''' + FORGED + r'''")


@flow("Hostile", description="\x1b[2Jwipes\x1bc the screen", tags={"team": "\x1b[31mred"})
def hostile():
    noisy()
'''


def write(path: Path, source: str) -> Path:
    path.write_text(HEADER + textwrap.dedent(source), encoding="utf-8")
    return path


def cli(tmp_path: Path, *args: str):
    return run_cli(*args, "--reports-dir", str(tmp_path / "reports"),
                   "--log-dir", str(tmp_path / "logs"), cwd=tmp_path)


def test_list_shows_descriptions_and_tags_cleaned(tmp_path: Path) -> None:
    result = cli(tmp_path, "--flows", str(write(tmp_path / "hostile.py", HOSTILE)), "--list")
    assert result.code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Hostile  [team=red]",
        "    wipes the screen",
        "    - noisy  ~1000 ms",
    ]


def test_terminal_view_and_final_line_are_cleaned(tmp_path: Path) -> None:
    result = cli(tmp_path, "--flows", str(write(tmp_path / "hostile.py", HOSTILE)), "--run-all")
    assert result.code == 1, result.stdout + result.stderr
    assert not DRIVES_TERMINAL.search(result.stdout), repr(result.stdout)
    assert not DRIVES_TERMINAL.search(result.stderr), repr(result.stderr)
    assert "cleared screen red" in result.stdout and "bidi evil end" in result.stdout
    assert "bad note" in result.stdout
    # The run's own line, then the index's.
    *_, final, index = result.stdout.splitlines()
    assert final.startswith("Hostile: FAILED  report: ") and index.startswith("All runs: ")


def test_worker_log_entries_are_cleaned_and_cannot_be_forged(fake, tmp_path: Path) -> None:
    worker = start_worker(fake.url, write(tmp_path / "hostile.py", HOSTILE), tmp_path)
    try:
        fake.wait_for(lambda: len(fake.flows) == 1, 15)
        run_id = fake.trigger("Hostile")
        fake.wait_for(lambda: "Hostile' FAILED" in worker_output(tmp_path), 20)
    finally:
        stop_worker(worker)
    out = worker_output(tmp_path)
    assert not DRIVES_TERMINAL.search(out), repr(out)
    (entry,) = [line for line in out.splitlines() if "task #0 noisy FAILED" in line]
    assert entry.endswith("FAILED: bad note") and run_id in entry, entry
    # The note's second line stays inside its entry, indented: never an entry of its own.
    assert f"\n    {FORGED}\n" in out and f"\n{FORGED}" not in out


# --- file names --------------------------------------------------------------------

LONG_NAMES = '''
@task
def step():
    return TaskResult(passed=True, note="ok")


@flow("L" * 256)
def longest():
    step()


@flow("L" * 200 + "M" * 56)
def same_start():
    step()


@flow("\u00e9" * 256)
def multibyte():
    step()


@flow("../" * 85)
def climbing():
    step()


@flow("Next")
def after():
    step()
'''


def test_longest_and_path_hostile_flow_names_get_reports(tmp_path: Path) -> None:
    path = write(tmp_path / "long_names.py", LONG_NAMES)
    result = cli(tmp_path, "--flows", str(path), "--run-all")
    assert result.code == 0, result.stdout + result.stderr
    reports = sorted((tmp_path / "reports").glob("*.json"))
    names = [json.loads(p.read_text(encoding="utf-8"))["flow_name"] for p in reports]
    assert sorted(names) == sorted(["L" * 256, "L" * 200 + "M" * 56, "\u00e9" * 256,
                                    "../" * 85, "Next"])
    assert len({p.stem for p in reports}) == 5
    for report in [*reports, *(tmp_path / "reports").glob("*.html"),
                   *(tmp_path / "logs").glob("*")]:
        assert report.parent.parent == tmp_path  # nothing climbed out of its directory
        assert len(report.name.encode()) <= 255
    assert sum(1 for line in result.stdout.splitlines() if ": COMPLETED  report: " in line) == 5


def test_a_long_run_id_from_the_backend_gets_a_log_file(fake, tmp_path: Path) -> None:
    path = write(tmp_path / "plain.py", '@task\ndef step():\n    print("stepped")\n\n'
                                        '@flow("Plain")\ndef plain():\n    step()\n')
    worker = start_worker(fake.url, path, tmp_path)
    try:
        fake.wait_for(lambda: len(fake.flows) == 1, 15)
        long_id = "r" * 256
        fake.queue_raw({"run_id": long_id, "flow_name": "Plain", "configuration": "x"})
        ended = re.compile(f"run {long_id}: flow 'Plain' (COMPLETED|FAILED)")
        fake.wait_for(lambda: ended.search(worker_output(tmp_path)), 20)
        # The worker goes on: the next run is served and logged.
        run_id = fake.trigger("Plain")
        fake.wait_for(lambda: fake.run(run_id)["state"] == "COMPLETED", 20)
    finally:
        stop_worker(worker)
    logs = list((tmp_path / "logs").glob("*.log"))
    assert all(len(p.name.encode()) <= 255 for p in logs)
    (long_log,) = [p for p in logs if p.name.startswith("r" * 60)]
    assert f"run {long_id} of flow 'Plain' started" in long_log.read_text()
    assert "OSError" not in worker_output(tmp_path)


LOUD_IMPORT = r'''
print("\x1b[2J\x1b]0;title\x07loud \x1b[31mimport\x1b[0m")
print("second line\n''' + FORGED + r'''", file=sys.stderr)


@task
def quiet():
    return TaskResult(passed=True)


@flow("Loud")
def loud():
    quiet()
'''


def test_what_a_flows_module_prints_at_import_reaches_the_log_cleaned(tmp_path: Path) -> None:
    # Printed in the fork server, not in a task: it used to reach the terminal raw.
    write(tmp_path / "loud_flows.py", LOUD_IMPORT)
    done = cli(tmp_path, "--flows", "loud_flows.py", "--run", "Loud")
    assert done.code == 0, done.stderr
    assert not DRIVES_TERMINAL.search(done.stdout + done.stderr)
    said = [line for line in done.stderr.splitlines() if "flows module output:" in line]
    assert [line.split("flows module output: ", 1)[1] for line in said] == [
        "loud import", "second line", FORGED]
    # Each line is an entry of the worker's own log, attributed; none passes for another.
    assert all(" INFO perfect_runner.flows: " in line for line in said)
    assert FORGED not in done.stderr.replace("flows module output: " + FORGED, "")
