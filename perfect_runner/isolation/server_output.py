"""What the fork server prints reaches the worker's log as clean lines.

A flows module may print while it is imported (in the fork server, and in each
child under the spawn start method), and the fork server's own crash dump goes
to its stderr. Both come here on a pipe, are split into bounded lines, and are
logged: the log's formatter cleans them (`textsafe`), so no escape sequence a
module prints can drive the terminal, and each line says where it came from.
"""

from __future__ import annotations

import logging
import os
import threading

from .lines import LineSplitter

log = logging.getLogger("perfect_runner.flows")
READ_SIZE = 65536


def relay(fd: int, name: str) -> threading.Thread:
    """Log what arrives on `fd` (the read end of the fork server's stdout and stderr)
    until every writer is gone; the thread owns `fd` and closes it."""
    thread = threading.Thread(target=_pump, args=(fd,), name=name, daemon=True)
    thread.start()
    return thread


def _pump(fd: int) -> None:
    splitter = LineSplitter()
    try:
        while data := os.read(fd, READ_SIZE):
            _emit(splitter.feed(data))
        _emit(splitter.finish())
    except OSError:
        pass  # closed under us: the worker is shutting down
    finally:
        os.close(fd)


def _emit(lines: list[str]) -> None:
    for line in lines:
        log.info("flows module output: %s", line)
