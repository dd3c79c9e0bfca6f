"""Worker-wide settings that shape every run (defaults for task options, limits)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_RESULT = 64 * 1024 * 1024


@dataclass
class RunOptions:
    task_timeout: float | None = None
    memory_limit: int | None = None
    retries: int = 0
    retry_delay: float = 0.0
    kill_grace: float = 2.0
    max_procs: int | None = None  # processes in one task's tree
    hard_memory_cap: bool = False  # also RLIMIT_AS = memory limit, for very fast allocators
    progress_interval: float = 0.5
    max_result: int = DEFAULT_MAX_RESULT
    child_env: dict[str, str] | None = None  # None: inherit the launcher's environment
    task_cwd: str | None = None
    task_workdir: str = "inherit"  # or "tmp": a fresh directory per task attempt
    keep_workdirs: bool = False
    notices: list[str] = field(default_factory=list)  # warnings repeated in every run's log
    task_user: int | None = None  # uid/gid task processes switch to (root workers)
    task_group: int | None = None
    rlimits: dict[str, int] = field(default_factory=lambda: {"core": 0})
    full_tracebacks: bool = False  # keep the runner's frames in tracebacks and stack dumps
