"""The RQ baseline of item 1: no-op jobs through a Redis-backed rq Queue and a real rq Worker.

    python bench/_rq_bench.py driver JOBS FLOWS_MODULE PORT
    python bench/_rq_bench.py worker FLOWS_MODULE PORT QUEUE     (started by the driver)

The bench process starts its own `redis-server` (`RedisServer`: 127.0.0.1, a free port, no
persistence, a temp dir) and stops it by PID at the end. Each batch runs `driver` in a fresh
interpreter, which:

1. starts `worker` in another fresh interpreter: it imports rq, redis and the flows module
   (preloaded, as perfect_runner's fork server has it), builds `rq.Worker([queue])` (the
   default forking worker: one work horse forked per job), connects, prints "ready" and waits
   for a line on stdin;
2. starts the clock (`time.perf_counter()`), enqueues JOBS jobs `"<flows module>.noop"` (the
   no-op task; outside a flow run it is a plain call) with `Queue.enqueue`, one after another,
   then tells the worker to go;
3. the worker runs `Worker.work(burst=True)` (for each job: dequeue, fork a work horse that
   runs it and stores its result, wait for the horse; then find the queue empty, register its
   death, return) and prints `time.perf_counter()` when `work()` returns. perf_counter is
   CLOCK_MONOTONIC, one clock for both processes;
4. checks that all JOBS jobs are finished and prints one sample as JSON:
   [(worker's end - driver's start) / JOBS] seconds per job.

So a sample covers enqueue of the first job to the return of the burst worker after the last;
the worker's start (interpreter, imports, connection) is not timed, its registration at the
start of `work()` and its teardown at the end are (a few ms per batch).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def unavailable() -> str | None:
    """Why the RQ baseline cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server not found (apt-get install redis-server)"
    missing = [m for m in ("rq", "redis") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install -e '.[bench]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on 127.0.0.1: a free port, no persistence, its own temp dir."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.log = directory / "redis-server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                 "--save", "", "--appendonly", "no", "--daemonize", "no",
                 "--dir", str(directory)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=directory)
        deadline = time.monotonic() + 10
        while not self._ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(f"redis-server did not start: {' '.join(tail)}")
            time.sleep(0.02)

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 15)  # SIGTERM: redis exits (nothing to save)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, 9)
                self.proc.wait()


def batch(jobs: int, module: str, port: int, timeout: float = 600) -> list[float]:
    """One timed batch in a fresh driver interpreter; [seconds per job]."""
    proc = subprocess.run([sys.executable, str(HERE), "driver", str(jobs), module, str(port)],
                          capture_output=True, text=True, timeout=timeout, cwd=HERE.parent.parent)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        raise RuntimeError(f"rq batch failed: {lines[-1]}")
    return [float(x) for x in json.loads(proc.stdout.strip().splitlines()[-1])]


def _driver(jobs: int, module: str, port: int) -> None:
    from redis import Redis
    from rq import Queue
    from rq.registry import FinishedJobRegistry

    name = Path(module).stem
    queue_name = f"bench-{os.getpid()}"
    connection = Redis(host="127.0.0.1", port=port)
    queue = Queue(queue_name, connection=connection)
    worker_log = open(f"{module}.rq-worker.log", "ab")  # closed below
    worker = subprocess.Popen([sys.executable, str(HERE), "worker", module, str(port), queue_name],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=worker_log,
                              text=True)
    try:
        if worker.stdout.readline().strip() != "ready":
            raise RuntimeError(f"rq worker did not start (see {worker_log.name})")
        start = time.perf_counter()
        ids = [queue.enqueue(f"{name}.noop").id for _ in range(jobs)]
        worker.stdin.write("go\n")
        worker.stdin.flush()
        end = float(worker.stdout.readline())
        if worker.wait(60) != 0:
            raise RuntimeError(f"rq worker exited {worker.returncode}")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        worker_log.close()
    finished = set(FinishedJobRegistry(queue=queue).get_job_ids())
    if not_done := [i for i in ids if i not in finished]:
        raise RuntimeError(f"{len(not_done)} of {jobs} rq jobs did not finish")
    queue.delete(delete_jobs=True)
    print(json.dumps([(end - start) / jobs]))


def _worker(module: str, port: int, queue_name: str) -> None:
    path = Path(module).resolve()
    sys.path.insert(0, str(path.parent))
    importlib.import_module(path.stem)  # preloaded: every work horse inherits it

    from redis import Redis
    from rq import Queue, Worker

    # rq logs to stdout: send that to the log file (stderr) and talk to the driver on a copy.
    driver = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    connection = Redis(host="127.0.0.1", port=port)
    worker = Worker([Queue(queue_name, connection=connection)], connection=connection)
    connection.ping()
    print("ready", file=driver, flush=True)
    sys.stdin.readline()
    worker.work(burst=True)
    end = time.perf_counter()
    print(end, file=driver, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "driver":
        _driver(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "worker":
        _worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
