"""What one task attempt gets: its limits, its process settings, its working directory.

Task options from `@task(...)` win over the worker-wide defaults on the command line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from ..isolation.metadata import TaskMeta
from ..isolation.process_setup import ProcessSetup
from ..isolation.supervisor import TaskLimits
from .options import RunOptions


def task_limits(meta: TaskMeta | None, options: RunOptions) -> TaskLimits:
    """`meta` is None for a task the flow process did not describe at start."""
    timeout = meta.timeout if meta else None
    return TaskLimits(
        timeout=timeout if timeout is not None else options.task_timeout,
        memory_limit=(meta.memory_limit if meta else None) or options.memory_limit,
        max_procs=options.max_procs,
        kill_grace=options.kill_grace,
        max_result=options.max_result,
    )


def process_setup(options: RunOptions, limits: TaskLimits | None = None,
                  cwd: str | None = None) -> dict[str, Any]:
    """The ProcessSetup a flow or task process applies to itself before user code."""
    # No RLIMIT_NPROC for --max-procs: it counts the threads of every process of the
    # user (so a 500-thread task fails), root ignores it, and concurrent runs share
    # it. The supervisor counts the processes of the task's own tree instead.
    rlimits = dict(options.rlimits)
    if limits and options.hard_memory_cap and limits.memory_limit:
        rlimits["as"] = limits.memory_limit
    return ProcessSetup(env=options.child_env, cwd=cwd or options.task_cwd, rlimits=rlimits,
                        user=options.task_user, group=options.task_group,
                        full_tracebacks=options.full_tracebacks).to_json()


@contextlib.contextmanager
def task_workdir(options: RunOptions, run_id: str, index: int, attempt: int
                 ) -> Iterator[str | None]:
    """A fresh directory per attempt with `--task-workdir tmp`, else the worker's own."""
    if options.task_workdir != "tmp":
        yield None
        return
    path = tempfile.mkdtemp(prefix=f"perfect-{run_id}-{index}-{attempt}-")
    if options.task_user is not None:
        os.chown(path, options.task_user, options.task_group or -1)
    try:
        yield path
    finally:
        if not options.keep_workdirs:
            shutil.rmtree(path, ignore_errors=True)
