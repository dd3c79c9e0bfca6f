"""`python -m perfect_runner` / `perfect-runner`: local mode or the worker."""

from __future__ import annotations

import logging
import os
import signal
import sys

from .config import UsageError, child_environment, parse_args, run_options
from .executor.engine import FlowExecutor
from .isolation.launcher import LaunchError
from .isolation.oskit import make_undumpable
from .local.interrupt import exit_code
from .sdk.result import TaskState
from .textsafe import CleanFormatter, clean_text

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C outside a run (loading the flows, shutting down): no traceback.
        print("perfect-runner: interrupted", file=sys.stderr)
        return exit_code(signal.SIGINT)


def _main(argv: list[str] | None) -> int:
    try:
        args = parse_args(argv)
        options = run_options(args)
        child_env = child_environment(args, dict(os.environ))
    except UsageError as exc:
        return _usage(str(exc))
    if args.token:
        # Our /proc/<pid>/environ and memory then belong to root: a task running as our
        # user cannot read the token from its ancestor.
        make_undumpable()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(CleanFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level, handlers=[handler])
    try:
        executor = FlowExecutor(args.flows, args.start_method, options, env=child_env,
                                sandbox=args.sandbox)
    except LaunchError as exc:
        return _usage(str(exc))
    try:
        return _dispatch(args, executor)
    except UsageError as exc:
        return _usage(str(exc))
    finally:
        executor.close()


def _dispatch(args, executor: FlowExecutor) -> int:
    if not executor.flows:
        raise UsageError(f"no flows found in {', '.join(args.flows)}: decorate a function "
                         "with @flow(name=...)")
    if args.list:
        from .local.runner import list_flows

        list_flows(executor)
        return EXIT_OK
    names = list(executor.flows) if args.run_all else args.run
    unknown = [n for n in names if n not in executor.flows]
    if unknown:
        raise UsageError(f"unknown flow {unknown[0]!r}: known flows are "
                         + ", ".join(repr(n) for n in executor.flows))
    # Only now: a usage error is not preceded by warnings about a run that never starts.
    _warn_about_setup(args, executor.options)
    if args.server is None:
        from .local.runner import run_locally

        records, signum = run_locally(executor, names, args.log_dir, args.reports_dir,
                                      max_log_bytes=args.max_log_bytes)
        if signum is not None:
            return exit_code(signum)
        return EXIT_OK if all(r.state == TaskState.COMPLETED for r in records) else EXIT_FAILED
    from .worker import serve

    return serve(args, executor, names)


def _warn_about_setup(args, options) -> None:
    log = logging.getLogger("perfect_runner")
    if os.geteuid() == 0 and options.task_user is None:
        log.warning("running as root: tasks run as root too; use --task-user NAME to run "
                    "them as another user")
    if args.insecure and args.server:
        notice = ("TLS certificate verification is OFF (--insecure): the backend's identity "
                  "is not checked")
        log.warning(notice)
        options.notices.append(notice)


def _usage(message: str) -> int:
    # The message may quote user code (an import error, a flow name): one clean line.
    print(f"perfect-runner: error: {clean_text(message)}", file=sys.stderr)
    return EXIT_USAGE
