"""Baselines for the task-start benchmarks, each run in a fresh interpreter.

    python bench/_baselines.py VARIANT CALLS FLOWS_MODULE [--ballast-gib N]

imports FLOWS_MODULE (as a fork server would: preloaded), then times CALLS
calls of its no-op task the given way and prints the per-call times (seconds)
as one JSON list. This process is small, like perfect_runner's fork server, so
the floors compare like with like. Variants:

- inprocess:     a plain function call;
- fork:          os.fork() + pipe + the pickled result, waitpid (the floor);
- mp_fork:       multiprocessing.Process, "fork" context, result over a Pipe;
- mp_forkserver: multiprocessing.Process, "forkserver" context as shipped,
                 with the flows module preloaded (set_forkserver_preload);
- pool_mtpc1:    ProcessPoolExecutor(max_tasks_per_child=1), the default
                 context for that option in 3.11 ("spawn").

--ballast-gib N makes this process hold N GiB (touched) before timing.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import pickle
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _load(module_path: str):
    path = Path(module_path).resolve()
    sys.path.insert(0, str(path.parent))
    return importlib.import_module(path.stem)


def _time(calls: int, one_call) -> list[float]:
    timings = []
    for _ in range(calls):
        start = time.perf_counter()
        one_call()
        timings.append(time.perf_counter() - start)
    return timings


def _fork_call(func) -> object:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        data = pickle.dumps(func(), protocol=pickle.HIGHEST_PROTOCOL)
        os.write(write_fd, data)
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    return pickle.loads(b"".join(chunks))


def _mp_target(conn, module_name: str) -> None:
    conn.send(importlib.import_module(module_name).noop())
    conn.close()


def _mp_call(ctx, module_name: str) -> object:
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_mp_target, args=(child_end, module_name))
    proc.start()
    child_end.close()
    result = parent_end.recv()
    parent_end.close()
    proc.join()
    return result


def main(argv: list[str]) -> None:
    variant, calls, module_path = argv[0], int(argv[1]), argv[2]
    ballast = None
    if "--ballast-gib" in argv:
        ballast = bytearray(int(argv[argv.index("--ballast-gib") + 1]) << 30)
        for offset in range(0, len(ballast), 4096):
            ballast[offset] = 1
    module = _load(module_path)
    name = module.__name__
    # The SDK's wrapper: outside a flow run it is a plain call (and it pickles by name).
    func = module.noop
    if variant == "inprocess":
        timings = _time(calls, func)
    elif variant == "fork":
        timings = _time(calls, lambda: _fork_call(func))
    elif variant in ("mp_fork", "mp_forkserver"):
        ctx = multiprocessing.get_context(variant[3:])
        if variant == "mp_forkserver":
            ctx.set_forkserver_preload([name])
        _mp_call(ctx, name)  # start the fork server outside the timing
        timings = _time(calls, lambda: _mp_call(ctx, name))
    elif variant == "pool_mtpc1":
        with ProcessPoolExecutor(max_workers=1, max_tasks_per_child=1) as pool:
            pool.submit(func).result()  # first worker outside the timing
            timings = _time(calls, lambda: pool.submit(func).result())
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    print(json.dumps(timings))


if __name__ == "__main__":
    main(sys.argv[1:])
