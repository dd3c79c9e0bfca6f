"""Many runs at once in one control process: file descriptors past 1024, and a worker
at --concurrency 16 whose runs all complete exactly once while its heartbeat keeps time.
"""

from __future__ import annotations

import os
import resource

import pytest

FD_FLOWS = """
@task
def chatty():
    for i in range(300):
        print(f"line {i}")
    return TaskResult(passed=True, note="printed")


@flow("high fds")
def high_fds():
    chatty()
    chatty()
"""


@pytest.fixture
def fds_past_1024():
    """Hold open files until the next fd number is past 1024, as a worker running ~64 runs
    at once does (each run holds ~16: pipes, channels, pidfds, its log file, a socket)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1400")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
    held = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_run_whose_fds_are_past_1024_completes(fds_past_1024, write_flows, run_flow):
    # select() refuses fd numbers >= 1024 (FD_SETSIZE); every pipe, channel and pidfd
    # of this run is past it, so each wait on them must not use select.
    ran = run_flow(write_flows(FD_FLOWS), "high fds")
    assert ran.record.state == "COMPLETED", [t.note for t in ran.record.tasks]
    assert [t.note for t in ran.record.tasks] == ["printed", "printed"]
    assert ran.events.lines(0) == [f"line {i}" for i in range(300)]
    assert ran.events.lines(1)[-1] == "line 299"


