"""Command-line options; each also readable from a PERFECT_* environment variable."""

from __future__ import annotations

import argparse
import fnmatch
import grp
import os
import pwd
from collections.abc import Callable
from typing import Any

from . import __version__
from .executor.options import DEFAULT_MAX_RESULT, RunOptions
from .isolation.protocol import MAX_BLOB
from .local.logfile import DEFAULT_MAX_BYTES as DEFAULT_MAX_LOG_BYTES
from .sdk.units import format_size, parse_size

DEFAULT_SERVER = "http://localhost:3000"
START_METHODS = ("forkserver", "spawn")
WORKDIRS = ("inherit", "tmp")
SANDBOX_MODES = ("auto", "namespace", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MIN_LOG_FILE = 16 * 1024


class UsageError(Exception):
    """A bad option or environment value; one line, exit code 2."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(f"PERFECT_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perfect-runner",
        description="Run Perfect flows with every task in its own isolated process. "
        "Without --run/--run-all/--list it is a worker serving the backend at --server. "
        "Every option can also be set as PERFECT_<OPTION> (e.g. PERFECT_CONCURRENCY=2).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add = p.add_argument_group("what to run").add_argument
    add("--flows", action="append", metavar="MODULE", default=None,
        help="flows module: dotted name or path to a .py file (repeatable) [PERFECT_FLOWS, "
        "comma-separated]")
    add("--list", action="store_true", help="list the flows and their tasks, then exit")
    add("--run", action="append", metavar="FLOW", default=[],
        help="run this flow (repeatable); local mode unless --server is given")
    add("--run-all", action="store_true", help="run every flow (local mode unless --server)")
    add("--start-method", choices=START_METHODS,
        default=_env_choice("START_METHOD", "forkserver", START_METHODS),
        help="how task processes start: forkserver (default; a small fork server with the "
        "flows modules preloaded) or spawn (a fresh interpreter per process)")
    add("--sandbox", choices=SANDBOX_MODES,
        default=_env_choice("SANDBOX", "auto", SANDBOX_MODES),
        help="auto (default): run flows and tasks in a PID and mount namespace of their own "
        "when this machine allows it, else plain processes with one warning; namespace: "
        "the same, or exit if not possible; off: plain processes (tasks see the host's "
        "processes); see 'Security model' in the README")
    add = p.add_argument_group("worker mode (a Perfect backend)").add_argument
    add("--server", default=None, metavar="URL",
        help=f"Perfect backend URL [PERFECT_SERVER_URL, default {DEFAULT_SERVER} in worker mode]")
    add("--concurrency", type=int, default=_env_int("CONCURRENCY", 1), metavar="N",
        help="flow runs at once (default 1)")
    add("--progress-interval", type=float, default=_env_float("PROGRESS_INTERVAL", 0.5),
        metavar="SECONDS", help="RUNNING updates per task at most this often (default 0.5)")
    add("--shutdown-grace", type=float, default=_env_float("SHUTDOWN_GRACE", 3.0),
        metavar="SECONDS", help="on SIGTERM, time running tasks get to finish (default 3)")
    add("--final-flush", type=float, default=_env_float("FINAL_FLUSH", 60),
        metavar="SECONDS", help="at the end of a --run and at shutdown, keep delivering "
        "pending updates for up to this long while deliveries progress (it gives up "
        "sooner after 10 s without one); runs the backend did not hear the end of are "
        "named and the exit code is 1 (default 60)")
    add("--library-check", type=float, default=_env_float("LIBRARY_CHECK", 30),
        metavar="SECONDS", help="read the backend's library at start and after a run at "
        "most this often, to warn once about each flow this worker does not serve "
        "(0: after every run; default 30)")
    add("--log-rate", type=float, default=_env_float("LOG_RATE", 20), metavar="N",
        help="log entries per second per run after a burst of 50; output faster than "
        "that, or than the backend answers, is joined into entries of several lines "
        "(default 20)")
    add("--max-log-entries", type=int, default=_env_int("MAX_LOG_ENTRIES", 2000), metavar="N",
        help="log entries per run sent to the backend; the rest stays in the local "
        "log file (default 2000)")
    add("--token", default=_env("TOKEN"), help="sent as 'Authorization: Bearer ...' on every "
        "request (for a backend behind an authenticating proxy); never logged, never passed "
        "to tasks [PERFECT_TOKEN]")
    add("--ca-bundle", default=_env("CA_BUNDLE"), metavar="PATH",
        help="CA certificates to verify an HTTPS backend with (private CA)")
    add("--insecure", action="store_true", default=_env_bool("INSECURE"),
        help="do not verify the backend's TLS certificate (warned at start and in every "
        "run's log)")
    add = p.add_argument_group(
        "task limits (defaults for every task; @task(...) options win)").add_argument
    add("--task-timeout", type=float, default=_env_float("TASK_TIMEOUT"), metavar="SECONDS",
        help="default task timeout in seconds (default none)")
    add("--kill-grace", type=float, default=_env_float("KILL_GRACE", 2.0), metavar="SECONDS",
        help="after a timeout, how long a task may clean up before SIGKILL (default 2)")
    add("--memory-limit", default=_env("MEMORY_LIMIT"), metavar="SIZE",
        help="default task memory limit, e.g. 512MB (default none)")
    add("--hard-memory-cap", action="store_true", default=_env_bool("HARD_MEMORY_CAP"),
        help="also cap each task's address space at its memory limit (RLIMIT_AS), for "
        "allocations faster than the 50 ms RSS sampling")
    add("--max-procs", type=int, default=_env_int("MAX_PROCS"), metavar="N",
        help="most processes one task's tree may have; more (a fork bomb) kills the task "
        "(default none)")
    add("--cpu-limit", type=int, default=_env_int("CPU_LIMIT"), metavar="SECONDS",
        help="CPU seconds per task process, RLIMIT_CPU (default none)")
    add("--max-open-files", type=int, default=_env_int("MAX_OPEN_FILES", 1024), metavar="N",
        help="open files per task process, RLIMIT_NOFILE (default 1024)")
    add("--max-file-size", default=_env("MAX_FILE_SIZE"), metavar="SIZE",
        help="largest file a task may write, RLIMIT_FSIZE, e.g. 1GB (default none)")
    add("--max-result-size", default=_env("MAX_RESULT_SIZE", str(DEFAULT_MAX_RESULT)),
        metavar="SIZE", help="largest task result or argument payload (default 64MiB)")
    add("--retries", type=int, default=_env_int("RETRIES", 0), metavar="N",
        help="default retries of a failed task (default 0)")
    add("--retry-delay", type=float, default=_env_float("RETRY_DELAY", 0), metavar="SECONDS",
        help="default pause between attempts (default 0)")
    add = p.add_argument_group("task environment").add_argument
    add("--task-user", default=_env("TASK_USER"), metavar="NAME",
        help="when the worker runs as root, run flow and task processes as this user")
    add("--task-group", default=_env("TASK_GROUP"), metavar="NAME",
        help="group for --task-user (default: the user's primary group)")
    add("--task-workdir", choices=WORKDIRS,
        default=_env_choice("TASK_WORKDIR", "inherit", WORKDIRS),
        help="inherit: tasks run in the worker's directory (default); tmp: a fresh "
        "temporary directory per task attempt, removed afterwards")
    add("--keep-workdirs", action="store_true", default=_env_bool("KEEP_WORKDIRS"),
        help="with --task-workdir tmp, keep the directories for inspection")
    add("--scrub-env", action="append", default=[], metavar="PATTERN",
        help="also remove environment variables matching this glob from what flows and "
        "tasks see (repeatable; PERFECT_TOKEN and *_TOKEN-like worker secrets always are)")
    add("--task-env", action="append", default=[], metavar="KEY=VALUE",
        help="add a variable to the environment flows and tasks see (repeatable)")
    add = p.add_argument_group("output").add_argument
    add("--log-dir", default=_env("LOG_DIR", "perfect-logs"), metavar="DIR",
        help="where every run's log is written, bounded by --max-log-file-size "
        "(default ./perfect-logs)")
    add("--max-log-file-size", default=_env("MAX_LOG_FILE_SIZE"), metavar="SIZE",
        help="largest size of one run's log file; past it the first part and the last "
        "part are kept, with a line saying how much was cut (default "
        f"{format_size(DEFAULT_MAX_LOG_BYTES)})")
    add("--reports-dir", default=_env("REPORTS_DIR", "reports"), metavar="DIR",
        help="where local mode writes HTML and JSON reports (default ./reports)")
    add("--log-level", default=_env_choice("LOG_LEVEL", "INFO", LOG_LEVELS),
        choices=LOG_LEVELS, help="runner log level (default INFO)")
    add("--full-tracebacks", action="store_true", default=_env_bool("FULL_TRACEBACKS"),
        help="keep the runner's own frames in task tracebacks and stack dumps (they are "
        "trimmed by default; useful to report a runner bug)")
    return p


def _env_bool(name: str) -> bool:
    """A yes/no PERFECT_* variable; unset or empty is no, anything unrecognised an error."""
    value = _env(name, "")
    key = value.strip().lower()
    if key in _FALSE:
        return False
    if key in _TRUE:
        return True
    raise UsageError(f"PERFECT_{name}={value!r} is not a yes/no value: use 1/0, true/false, "
                     "yes/no or on/off")


def _env_int(name: str, default: int | None = None) -> int | None:
    return _env_number(name, default, int, "a whole number")


def _env_float(name: str, default: float | None = None) -> float | None:
    return _env_number(name, default, float, "a number")


def _env_number(name: str, default: Any, convert: Callable[[str], Any], what: str) -> Any:
    value = _env(name, "")
    if value.strip() == "":
        return default
    try:
        return convert(value.strip())
    except ValueError:
        raise UsageError(f"PERFECT_{name}={value!r} is not {what}") from None


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    # argparse checks choices on the command line only, not on defaults.
    value = _env(name, "") or default
    if value not in choices:
        raise UsageError(f"PERFECT_{name}={value!r}: use one of {', '.join(choices)}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if not args.flows and _env("FLOWS"):
        args.flows = [m.strip() for m in _env("FLOWS").split(",") if m.strip()]
    if not args.flows:
        raise UsageError("no flows module given: pass --flows MODULE (e.g. --flows "
                         "examples/example_flows.py)")
    if args.server is None and not (args.run or args.run_all or args.list):
        args.server = os.environ.get("PERFECT_SERVER_URL", DEFAULT_SERVER)
    _check(args.concurrency >= 1, "--concurrency must be at least 1")
    _check(args.retries >= 0, "--retries must be 0 or more")
    _check(args.progress_interval > 0, "--progress-interval must be positive")
    args.max_log_bytes = (_size("--max-log-file-size", args.max_log_file_size)
                          or DEFAULT_MAX_LOG_BYTES)
    _check(args.max_log_bytes >= MIN_LOG_FILE, "--max-log-file-size must be at least 16KiB")
    _check(args.final_flush >= 0, "--final-flush must be 0 or more")
    _check(args.library_check >= 0, "--library-check must be 0 or more")
    return args


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


ALWAYS_SCRUBBED = ("PERFECT_TOKEN", "PERFECT_*TOKEN*", "PERFECT_*SECRET*", "PERFECT_*PASSWORD*")


def child_environment(args: argparse.Namespace, base: dict[str, str]) -> dict[str, str]:
    """What flow and task processes see: the worker's environment minus its secrets."""
    patterns = [*ALWAYS_SCRUBBED, *args.scrub_env]
    env = {k: v for k, v in base.items()
           if not any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    for item in args.task_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--task-env {item!r}: use KEY=VALUE")
        env[key] = value
    return env


def run_options(args: argparse.Namespace) -> RunOptions:
    user, group = task_identity(args.task_user, args.task_group)
    return RunOptions(
        task_user=user,
        task_group=group,
        task_workdir=args.task_workdir,
        keep_workdirs=args.keep_workdirs,
        rlimits=_rlimits(args),
        task_timeout=args.task_timeout,
        memory_limit=_size("--memory-limit", args.memory_limit),
        retries=args.retries,
        retry_delay=args.retry_delay,
        kill_grace=args.kill_grace,
        max_procs=args.max_procs,
        hard_memory_cap=args.hard_memory_cap,
        progress_interval=args.progress_interval,
        max_result=_result_cap(args.max_result_size),
        full_tracebacks=args.full_tracebacks,
    )


def _rlimits(args: argparse.Namespace) -> dict[str, int]:
    limits = {"core": 0, "nofile": args.max_open_files}
    if args.cpu_limit:
        limits["cpu"] = args.cpu_limit
    size = _size("--max-file-size", args.max_file_size)
    if size:
        limits["fsize"] = size
    return limits


def task_identity(user: str | None, group: str | None) -> tuple[int | None, int | None]:
    """uid and gid for --task-user/--task-group (names or numbers)."""
    if user is None and group is None:
        return None, None
    if os.geteuid() != 0:
        raise UsageError("--task-user/--task-group need a worker running as root")
    uid = gid = None
    if user is not None:
        try:
            entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        except KeyError:
            raise UsageError(f"--task-user {user!r}: no such user") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError:
            raise UsageError(f"--task-group {group!r}: no such group") from None
    return uid, gid


def _size(option: str, value: str | None) -> int | None:
    return _convert(option, value, parse_size)


def _result_cap(value: str | None) -> int:
    cap = _size("--max-result-size", value) or DEFAULT_MAX_RESULT
    # A frame's payload length is 32 bits: the biggest payload it can announce.
    if cap > MAX_BLOB:
        raise UsageError(f"--max-result-size {value}: at most {MAX_BLOB:,} bytes "
                         "(4 GiB - 1), the biggest payload a frame can carry")
    return cap


def _convert(option: str, value: Any, convert: Callable[[Any], Any]) -> Any:
    try:
        return convert(value)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None
