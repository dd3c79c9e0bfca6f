"""Entry point of a child under the "spawn" start method: a fresh interpreter.

It imports the flows modules itself (nothing is inherited from a fork server),
then runs the same bootstrap as a forked child.
"""

from __future__ import annotations

import json
import os
import sys

from .child_bootstrap import ChildConfig, become_child, preload_roles
from .loader import ModuleLoadError, load_modules
from .protocol import EXIT_BOOTSTRAP


def main() -> None:
    spec = json.loads(sys.argv[1])
    sys.path[:0] = [p for p in spec["sys_path"] if p not in sys.path]
    out_fd, err_fd, chan_fd = spec["fds"]
    try:
        load_modules(spec["modules"])
    except ModuleLoadError as exc:
        os.write(err_fd, f"perfect_runner: {exc}\n".encode(errors="replace"))
        os._exit(EXIT_BOOTSTRAP)
    preload_roles()
    become_child(ChildConfig(**spec["config"]), out_fd, err_fd, chan_fd)


if __name__ == "__main__":
    main()
