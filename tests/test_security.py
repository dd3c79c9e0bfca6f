"""Secrets stay in the control process: tasks never see the worker's token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fake_perfect import FakePerfect

TOKEN = "tok-3f9a2c-never-leak"

FLOWS = textwrap.dedent('''
    import json, os
    from pathlib import Path
    from perfect_runner import task, flow, TaskResult

    def ancestors():
        """Each ancestor's pid and what its /proc/<pid>/environ shows us."""
        found, pid = [], os.getpid()
        while pid > 1:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            except OSError as exc:
                environ = f"unreadable: {exc}"
            found.append([pid, environ])
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        return found

    @task
    def snoop():
        seen = {"environ": dict(os.environ), "ancestors": ancestors()}
        Path(os.environ["DUMP_PATH"]).write_text(json.dumps(seen))
        print("EXTRA=" + os.environ.get("EXTRA_VAR", "missing"))
        print("SCRUBBED=" + os.environ.get("MY_API_KEY", "gone"))
        return TaskResult(passed=True)

    @flow(name="Snoop")
    def snoop_flow():
        snoop()
''')


def assert_no_token_below(dump: Path, control_pid: int) -> None:
    seen = json.loads(dump.read_text())
    assert TOKEN not in json.dumps(seen["environ"])
    for pid, environ in seen["ancestors"]:
        if pid == control_pid:
            break  # the fork server and flow process are checked; see the next lines
        assert TOKEN not in environ, f"token visible in /proc/{pid}/environ"
    control = [environ for pid, environ in seen["ancestors"] if pid == control_pid]
    assert control, "the control process is an ancestor of every task"
    if os.geteuid() != 0:
        # The control process made itself undumpable: its environ is root's to read.
        assert TOKEN not in control[0]


@pytest.mark.timeout(60)
def test_worker_token_reaches_backend_but_no_task(tmp_path: Path) -> None:
    module = tmp_path / "snoop_flows.py"
    module.write_text(FLOWS)
    dump = tmp_path / "seen.json"
    env = {**os.environ, "PERFECT_TOKEN": TOKEN, "MY_API_KEY": "k", "DUMP_PATH": str(dump)}
    with FakePerfect(poll_hold=2.0) as fake:
        worker = subprocess.Popen(
            [sys.executable, "-m", "perfect_runner", "--flows", str(module), "--server",
             fake.url, "--log-dir", str(tmp_path / "logs"), "--scrub-env", "MY_API_*",
             "--task-env", "EXTRA_VAR=added", "--log-level", "DEBUG"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            fake.wait_for(lambda: fake.flows, 15)
            run_id = fake.trigger("Snoop")
            fake.wait_for(lambda: fake.run(run_id)["state"] in ("COMPLETED", "FAILED"), 20)
            lines = "\n".join(fake.logs(run_id)).splitlines()
        finally:
            worker.send_signal(signal.SIGTERM)
            output, _ = worker.communicate(timeout=10)
        auth = {r.headers.get("Authorization") for r in fake.requests}
    assert auth == {f"Bearer {TOKEN}"}
    assert "[Task Output] EXTRA=added" in lines
    assert "[Task Output] SCRUBBED=gone" in lines
    assert_no_token_below(dump, worker.pid)
    assert TOKEN not in output
    assert TOKEN not in "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
