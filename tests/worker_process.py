"""The worker as a user runs it: `python -m perfect_runner` in its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def start_worker(url: str, module: Path, tmp_path: Path, *extra: str,
                 env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen:
    """`python -m perfect_runner` serving `url`; its output goes to a worker-N.out file
    (a pipe nobody reads could block a chatty worker). MARKER_DIR is tmp_path; `env`
    adds variables (PERFECT_* ones from the test's own environment are left out);
    `preexec_fn` runs in the worker's process before it starts (to set rlimits)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PERFECT_")},
           **(env or {})}
    env["MARKER_DIR"] = str(tmp_path)
    out_path = tmp_path / f"worker-{len(list(tmp_path.glob('worker-*.out')))}.out"
    with open(out_path, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "perfect_runner", "--flows", str(module), "--server", url,
             "--log-dir", str(tmp_path / "logs"), "--progress-interval", "0.2", *extra],
            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
        )


def stop_worker(proc: subprocess.Popen) -> None:
    """SIGTERM, as the UI's Stop does; SIGKILL if it is not gone in 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def worker_output(tmp_path: Path) -> str:
    """Everything the workers started in tmp_path printed so far."""
    return "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("worker-*.out")))
