"""Flows whose tasks misbehave on purpose, to show what isolation buys.

"Faulty Tasks Showcase" runs one task per kind of fault a worker meets in the
wild (segfault, hang, memory blow-up, output flood, hard exit, exception,
plain failure), each marked ``crucial_pass=False`` and followed by a healthy
task, so the run shows the worker surviving every fault, naming it in the
task's note, and carrying on. "Crucial Failure Demo" shows the opposite: a
crucial task fails and the run stops there. "Kill The Fork Server" and "Kill
The Flow Process" have a task SIGKILL a parent: that run fails saying so, and
the next run works (a new fork server is started when it is the server; in the
sandbox, the default where the machine allows it, the fork server survives).

Run with ``python -m perfect_runner --flows faulty_flows``. The faults are
bounded even without the runner's limits (the memory hog stops at 400 MB, the
flood at 50,000 lines), except the hang, which relies on its timeout.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

from perfect_runner import TaskResult, flow, task

_MB = 1024 * 1024
_HOG_CHUNK_MB = 10
_HOG_CAP_MB = 400
_FLOOD_LINES = 50_000


@task(estimated_time=200)
def healthy_step(after: str) -> TaskResult:
    """A healthy task that runs after each fault"""
    print(f"Healthy step after {after}: pid {os.getpid()} doing fine")
    time.sleep(0.05)
    return TaskResult(passed=True, note=f"Worker still healthy after {after}")


@task(estimated_time=200)
def kill_fork_server() -> TaskResult:
    """SIGKILL the fork server, this task's parent"""
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(1)  # without the sandbox: dies with its parent first
    # In the sandbox the fork server is init of its own PID namespace: the kernel
    # drops signals from inside that it has no handler for.
    return TaskResult(passed=False, note="the sandbox kept the fork server alive")


@task(estimated_time=200)
def kill_flow_process(flow_pid: int) -> None:
    """SIGKILL the flow process that called this task"""
    os.kill(flow_pid, signal.SIGKILL)
    time.sleep(10)  # stopped first: its result has nowhere to go


@flow("Kill The Fork Server", description="A task SIGKILLs the fork server.",
      tags={"purpose": "demo"})
def kill_the_fork_server() -> None:
    kill_fork_server()


@flow("Kill The Flow Process", description="A task SIGKILLs its flow process.",
      tags={"purpose": "demo"})
def kill_the_flow_process() -> None:
    kill_flow_process(os.getpid())


@task(estimated_time=200, crucial_pass=False)
def segfault() -> TaskResult:
    """Dereference a null pointer (SIGSEGV)"""
    print("About to read address 0...", flush=True)
    ctypes.string_at(0)
    return TaskResult(passed=True, note="unreachable: the read should have crashed")


@task(estimated_time=1000, crucial_pass=False, timeout=1)
def hang_forever() -> TaskResult:
    """Sleep far past its 1 s timeout"""
    print("Sleeping for a day; the 1 s timeout should stop me", flush=True)
    time.sleep(86_400)
    return TaskResult(passed=False, note="the timeout was not enforced")


@task(estimated_time=2000, crucial_pass=False, memory_limit="200MB")
def memory_hog() -> TaskResult:
    """Allocate memory past its 200MB limit"""
    hoard = []
    for allocated_mb in range(_HOG_CHUNK_MB, _HOG_CAP_MB + 1, _HOG_CHUNK_MB):
        # bytes * n writes every page, so the memory is resident, not just reserved
        hoard.append(b"x" * (_HOG_CHUNK_MB * _MB))
        if allocated_mb % 50 == 0:
            print(f"Allocated {allocated_mb} MB", flush=True)
        time.sleep(0.01)  # gives the supervisor's memory sampling a chance to see growth
    return TaskResult(
        passed=False, note=f"Allocated {_HOG_CAP_MB} MB: the 200MB limit was not enforced"
    )


@task(estimated_time=2000, crucial_pass=False)
def flood_output() -> TaskResult:
    """Print 50,000 lines as fast as possible"""
    for number in range(1, _FLOOD_LINES + 1):
        print(f"flood line {number} of {_FLOOD_LINES}")
    return TaskResult(passed=True, note=f"Printed {_FLOOD_LINES:,} lines")


@task(estimated_time=200, crucial_pass=False)
def hard_exit() -> TaskResult:
    """Leave through os._exit(3) without returning a result"""
    print("Calling os._exit(3)", flush=True)
    os._exit(3)


@task(estimated_time=200, crucial_pass=False)
def raise_exception() -> TaskResult:
    """Raise an exception"""
    print("Looking up a key that does not exist...")
    config = {"region": "eu-west-1"}
    return TaskResult(passed=True, note=config["bucket"])


@task(estimated_time=200, crucial_pass=False)
def report_failure() -> TaskResult:
    """Return passed=False"""
    print("Validating data quality...")
    return TaskResult(
        passed=False,
        note="3 of 10 quality checks failed",
        table=[
            {"check": "no_nulls", "passed": False},
            {"check": "unique_ids", "passed": False},
            {"check": "fresh_data", "passed": False},
        ],
    )


@flow(
    "Faulty Tasks Showcase",
    description="Tasks that crash, hang, leak memory, flood output and fail; the worker survives.",
    tags={"purpose": "demo", "kind": "fault-injection"},
)
def faulty_tasks_showcase() -> None:
    healthy_step("start")
    segfault()
    healthy_step("segfault")
    hang_forever()
    healthy_step("hang")
    memory_hog()
    healthy_step("memory hog")
    flood_output()
    healthy_step("output flood")
    hard_exit()
    healthy_step("os._exit(3)")
    raise_exception()
    healthy_step("exception")
    report_failure()
    healthy_step("passed=False")


@task(estimated_time=200)
def prepare_input() -> TaskResult:
    """Stage the input files"""
    print("Staging input files...")
    return TaskResult(passed=True, note="Staged 3 files")


@task(estimated_time=200)
def validate_schema() -> TaskResult:
    """Validate the input schema (crucial)"""
    print("Validating schema...")
    return TaskResult(
        passed=False,
        note="Column 'amount' has type string, expected decimal",
        table=[{"column": "amount", "expected": "decimal", "found": "string"}],
    )


@task(estimated_time=200)
def publish_results() -> TaskResult:
    """Publish the results (never runs: the crucial task before it fails)"""
    print("Publishing results...")
    return TaskResult(passed=True, note="Published")


@flow(
    "Crucial Failure Demo",
    description="A crucial task fails and the run stops before publishing.",
    tags={"purpose": "demo"},
)
def crucial_failure_demo() -> None:
    prepare_input()
    validate_schema()
    publish_results()
