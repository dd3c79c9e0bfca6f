"""What a flow or task process applies to itself once it knows its work.

The setup travels in the first frame (RunTask / StartFlow), so a task process
can be started ahead of time and given its limits only when a task call comes.
It is applied before any user code: environment, working directory, resource
limits, the user, then (in the sandbox) the capabilities.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from typing import Any

from . import sandbox


@dataclass
class ProcessSetup:
    """What a child applies to itself once it knows its work, before any user code.

    It travels in the first frame (RunTask / StartFlow), so a task process can
    be started ahead of time and given its limits only when a task call comes.
    """

    env: dict[str, str] | None = None
    cwd: str | None = None
    rlimits: dict[str, int] = field(default_factory=dict)
    user: int | None = None  # switch to this uid (and group) before running user code
    group: int | None = None
    full_tracebacks: bool = False  # keep the runner's own frames in tracebacks

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def apply_setup(raw: dict[str, Any]) -> None:
    """Environment, working directory, resource limits, then the user: in that order."""
    config = ProcessSetup(**raw)
    if config.env is not None:
        os.environ.clear()
        os.environ.update(config.env)
    if config.cwd:
        os.chdir(config.cwd)
    for name, value in config.rlimits.items():
        limit = getattr(resource, f"RLIMIT_{name.upper()}")
        _, hard = resource.getrlimit(limit)
        capped = value if hard == resource.RLIM_INFINITY else min(value, hard)
        # CPU: a second of headroom so the soft limit's SIGXCPU is what ends the task.
        ceiling = capped + 1 if name == "cpu" else capped
        resource.setrlimit(limit, (capped, ceiling))
    _drop_privileges(config)
    if sandbox.INSIDE:
        sandbox.drop_capabilities()  # last: the limits above may need what it takes away


def _drop_privileges(config: ProcessSetup) -> None:
    # Last, after the pipes and limits: a task under another user can change neither.
    if config.user is None and config.group is None:
        return
    if config.group is not None:
        os.setgroups([])
        os.setgid(config.group)
    if config.user is not None:
        os.setuid(config.user)
