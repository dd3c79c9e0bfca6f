"""The worker: serve a Perfect backend, one flow run per execution request.

Threads of the control process:
- heartbeat: its own connection, a beat at start and every 3 s, whatever else happens;
- poller (the main loop below): long-polls only while a run slot is free and a
  fork server is running (while none is, the backend's work is better off with
  other workers; heartbeats go on: see `poll_forever`);
- one thread per running flow run (FlowRun.execute), draining its children;
- one sender thread per run (transport.sender), the only place a run's updates
  touch the network.
The main thread only waits for a stop signal.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import resource
import signal
import sys
import threading
import time
from typing import Any

from .executor.engine import FlowExecutor
from .executor.events import FanOut, NullListener, RunListener
from .executor.failed_run import report_failed_run
from .executor.flow_run import FlowRun
from .executor.records import RunRecord, TaskRecord
from .isolation.oskit import raise_open_files
from .isolation.outcome import Kind
from .local.logfile import LogFileListener
from .sdk.result import TaskState
from .textsafe import clean_text
from .transport.api import ApiError, BadRequest, ExecutionRequest, PerfectAPIClient
from .transport.backend_listener import BackendListener
from .transport.heartbeat import Heartbeat
from .transport.library import FlowLibrary, not_served_note

log = logging.getLogger("perfect_runner.worker")

# Open files of the control process: its own (log, sockets, fork server) plus, per
# run, the pipes, channels and pidfds of its flow process, task process and spare,
# its log file and its sender's connection (16-22 measured at --concurrency 64).
BASE_FDS, FDS_PER_RUN = 64, 24


class WorkerLog(NullListener):
    """The worker's own log: one line per run and task outcome."""

    def run_started(self, run: RunRecord) -> None:
        log.info("run %s: flow %r started", run.run_id, run.flow_name)

    def task_finished(self, run: RunRecord, task: TaskRecord) -> None:
        level = logging.INFO if task.state == TaskState.COMPLETED else logging.WARNING
        log.log(level, "run %s: task #%d %s %s%s", run.run_id, task.index, task.name,
                task.state, f": {task.note}" if task.note else "")

    def run_finished(self, run: RunRecord) -> None:
        log.info("run %s: flow %r %s", run.run_id, run.flow_name, run.state)


class Worker:
    def __init__(self, args: argparse.Namespace, executor: FlowExecutor) -> None:
        self.args = args
        self.executor = executor
        verify: bool | str = False if args.insecure else (args.ca_bundle or True)
        self.client = PerfectAPIClient(args.server, token=args.token, verify=verify)
        self.heartbeat = Heartbeat(self.client)
        self.backend = BackendListener(
            self.client, on_cancel=self._on_cancel, on_fault=self._on_fault,
            log_rate=args.log_rate,
            max_log_entries=args.max_log_entries, progress_interval=args.progress_interval)
        self.library = FlowLibrary(executor.flows,
                                   {name: executor.flow_tasks(name) for name in executor.flows},
                                   check_interval=args.library_check)
        self.listener: RunListener = FanOut(
            LogFileListener(args.log_dir, args.max_log_bytes), self.backend, WorkerLog())
        self.stop = threading.Event()
        self.slots = threading.Semaphore(args.concurrency)
        self.runs: dict[str, FlowRun] = {}
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._runs_changed = threading.Condition(self._lock)

    # --- start-up ---------------------------------------------------------

    def start(self) -> None:
        # A stale heartbeat on the backend fails the next run within 1 s: beat first.
        self.heartbeat.start()
        self.heartbeat.wait_first_beat(timeout=3.0)

    def register(self, flow_name: str) -> str | None:
        """Register one flow (a new library entry); its id, or None if the backend refused."""
        result = self.client.register_flow(self.library.payload(flow_name))
        if result.ok and isinstance(result.body, dict):
            flow_id = (result.body.get("flow") or {}).get("id")
            return flow_id if isinstance(flow_id, str) else None
        if result.status.name == "RETRYABLE":
            raise ApiError(result)
        log.error("backend refused flow %r: %s", flow_name, result.describe())
        return None

    def register_all(self, names: list[str]) -> dict[str, str]:
        """Register each flow, waiting (with backoff) while the backend is down."""
        ids: dict[str, str] = {}
        delay, said = 0.5, False
        while not self.stop.is_set():
            try:
                for name in names:
                    if name not in ids:
                        flow_id = self.register(name)
                        if flow_id:
                            ids[name] = flow_id
                log.info("registered %d flow(s) with %s", len(ids), self.args.server)
                return ids
            except ApiError as exc:
                if not said:
                    log.warning("Perfect backend at %s is not reachable (%s); retrying",
                                self.args.server, exc)
                    said = True
                self.stop.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, 10.0)
        return ids

    # --- serving ----------------------------------------------------------

    def poll_forever(self) -> None:
        delay, down = 0.5, False
        while not self.stop.is_set():
            if not self._fork_server_up():
                continue
            if not self.slots.acquire(timeout=0.5):
                continue  # every slot busy: leave queued runs to other workers
            try:
                request = self.client.poll_once()
            except BadRequest as exc:
                if exc.run_id is None:
                    self.slots.release()
                    log.error("ignoring a malformed execution request: %s", exc)
                    continue
                # A valid run id: the run must end FAILED, not stay RUNNING.
                log.error("run %s: refusing the execution request: %s", exc.run_id, exc)
                self._start_thread(exc.run_id, self._refuse, exc.run_id,
                                   exc.flow_name or "unknown flow",
                                   f"execution request refused: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - the poller must outlive any answer
                self.slots.release()
                if not down:
                    log.warning("cannot poll the Perfect backend (%s); retrying", exc,
                                exc_info=not isinstance(exc, ApiError))
                    down = True
                self.stop.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, 10.0)
                continue
            if down:
                log.info("Perfect backend reachable again")
                down, delay = False, 0.5
            if request is None or self.stop.is_set():
                self.slots.release()
                if request is not None:
                    log.warning("got run %s while stopping; not started", request.run_id)
                continue
            self._start_thread(request.run_id, self._serve_request, request)

    def _fork_server_up(self) -> bool:
        """Whether to poll now: not while no fork server runs (it is being restarted).

        A run taken now could only wait or fail; left in the queue, it goes to a
        healthy worker. Heartbeats go on meanwhile: the backend keeps one heartbeat
        time for all clients, so stopping ours would only get other workers' runs
        (and our runs still reporting their end) failed by its watchdog.
        """
        launcher = self.executor.launcher
        if launcher.running:
            return True
        log.warning("not polling for work: no fork server is running (%s)",
                    getattr(launcher, "down_reason", "") or "it died")
        while not self.stop.is_set() and not launcher.wait_running(0.5):
            pass
        if launcher.running:
            log.info("fork server running again (pid %s); polling for work again",
                     launcher.server_pid)
        return False

    def _start_thread(self, run_id: str, target: Any, *args: Any) -> None:
        """Serve one request on its own thread; the thread releases the run slot."""
        thread = threading.Thread(target=self._slot_released_after, args=(target, *args),
                                  name=f"run-{run_id}", daemon=True)
        with self._lock:
            self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        thread.start()

    def _slot_released_after(self, target: Any, *args: Any) -> None:
        try:
            target(*args)
        except Exception:  # noqa: BLE001 - one broken run must not stop the worker
            log.exception("run %s failed inside the runner", getattr(args[0], "run_id", args[0]))
        finally:
            self.slots.release()

    def _serve_request(self, request: ExecutionRequest) -> None:
        if request.flow_name not in self.executor.flows:
            self._refuse(request.run_id, request.flow_name, not_served_note(request.flow_name))
            return
        record = None
        try:
            record = self.execute_contained(request.flow_name, request.run_id)
            self._await_delivery(request.run_id)
        finally:
            if not self.stop.is_set():
                if record is not None:
                    self.library.learn(record)
                self._register_again(request.flow_name)
                self.library.check(self.client)

    def execute_contained(self, flow_name: str, run_id: str) -> RunRecord:
        """`execute`, and a run that could not even be built is reported FAILED."""
        try:
            return self.execute(flow_name, run_id)
        except Exception as exc:  # noqa: BLE001 - FlowRun contains the rest
            log.exception("run %s could not be started", run_id)
            note = f"the runner failed while starting this run: {type(exc).__name__}: {exc}"
            return report_failed_run(self.listener, flow_name, note, run_id)

    def execute(self, flow_name: str, run_id: str) -> RunRecord:
        run = self.executor.new_run(flow_name, self.listener, run_id=run_id)
        with self._lock:
            self.runs[run_id] = run
        try:
            return run.execute()
        finally:
            with self._runs_changed:
                self.runs.pop(run_id, None)
                self._runs_changed.notify_all()

    def _await_delivery(self, run_id: str) -> None:
        # The slot stays taken until the backend has heard how the run ended (its
        # sender drained): a worker at --concurrency 1 never polls with a run unfinished
        # on the backend, and the flow is back in the library only after its run ended.
        sender = self.backend.sender(run_id)
        while sender is not None and not sender.join(0.2) and not self.stop.is_set():
            pass

    def _register_again(self, flow_name: str) -> None:
        # A triggered run removes the flow from the backend's library; put it back.
        try:
            self.register(flow_name)
        except ApiError as exc:
            log.warning("could not re-register flow %r: %s", flow_name, exc)

    def _refuse(self, run_id: str, flow_name: str, note: str) -> None:
        """Report a run this worker will not execute as FAILED on the backend, with why."""
        report_failed_run(self.listener, flow_name, note, run_id)
        self._await_delivery(run_id)
        if not self.stop.is_set():
            self.library.check(self.client)

    def _on_fault(self, run_id: str, note: str) -> None:
        """The run's sender failed delivering an update: the run fails, saying so."""
        with self._lock:
            run = self.runs.get(run_id)
        if run is not None:
            run.abort(note)

    def _on_cancel(self, run_id: str) -> None:
        with self._lock:
            run = self.runs.get(run_id)
        if run is not None:
            log.warning("run %s: backend no longer wants it (404); stopping it", run_id)
            run.cancel("the backend no longer wants this run (stopped or timed out there)")

    # --- shutdown ---------------------------------------------------------

    def stop_runs(self) -> None:
        """Give running runs the shutdown grace, then stop the rest ("worker stopped")."""
        with self._runs_changed:
            self._runs_changed.wait_for(lambda: not self.runs, self.args.shutdown_grace)
            running = list(self.runs.values())
        for run in running:
            run.cancel("worker stopped", Kind.WORKER_STOPPED)

    def shutdown(self) -> bool:
        """Stop polling, stop the runs, deliver what is pending; False if some was lost."""
        self.stop.set()
        self.stop_runs()
        # Stopped runs report their end first (kill grace, then the last states).
        self._join_runs(time.monotonic() + self.args.kill_grace + 2.0)
        ok = self.final_flush()
        self.heartbeat.stop()
        return ok

    def final_flush(self) -> bool:
        """Deliver every run's pending updates (up to --final-flush s while they progress).

        Says which runs the backend did not hear the end of; False if there were some.
        """
        lost = self.backend.flush(self.args.final_flush)
        for run in lost:
            print(f"perfect-runner: could not finish run {clean_text(run.run_id)} (flow "
                  f"{clean_text(run.flow_name)!r}) on the backend at {self.args.server}: "
                  f"{run.left} update(s) not delivered; the full log is in "
                  f"{self.args.log_dir}", file=sys.stderr)
        return not lost

    def _join_runs(self, deadline: float) -> None:
        with self._lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def serve(args: argparse.Namespace, executor: FlowExecutor, names: list[str]) -> int:
    """Worker mode (no --run) or a client-initiated run of each named flow (--run)."""
    _open_files_for(args.concurrency)
    worker = Worker(args, executor)
    _install_signal_handlers(worker)
    worker.start()
    code = 1
    try:
        if args.run or args.run_all:
            code = _run_named(worker, names)
        else:
            worker.register_all(list(executor.flows))
            worker.library.check(worker.client, force=True)
            poller = threading.Thread(target=worker.poll_forever, name="poller", daemon=True)
            poller.start()
            worker.stop.wait()
            code = 0
    finally:
        # Exit non-zero when the backend did not hear how a run ended.
        if not worker.shutdown():
            code = 1
    return code


def _run_named(worker: Worker, names: list[str]) -> int:
    ok = True
    for name in names:
        flow_id = worker.register_all([name]).get(name)
        run_id = worker.client.create_run(flow_id) if flow_id else None
        if not run_id:
            print(f"perfect-runner: the backend did not create a run of {clean_text(name)!r}",
                  file=sys.stderr)
            ok = False
            continue
        record = worker.execute_contained(name, run_id)
        delivered = worker.final_flush()
        try:
            report = (worker.client.get_report(run_id) if delivered else None) or {}
        except ApiError:
            report = {}
        url = f"{worker.args.server.rstrip('/')}{report['url']}" if report.get("url") else "-"
        print(f"{clean_text(name)}: run {clean_text(run_id)} {record.state}  report: "
              f"{clean_text(url)}")
        ok = ok and delivered and record.state == TaskState.COMPLETED
    return 0 if ok else 1


def _open_files_for(concurrency: int) -> None:
    """Room for every run's fds: a common soft limit of 1024 is too few for ~60 runs,
    and a run that hits it fails ("Too many open files")."""
    need = BASE_FDS + FDS_PER_RUN * concurrency
    soft, hard = raise_open_files(need)
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning("--concurrency %d needs about %d open files, but the limit is %d (hard "
                    "limit %s): runs may fail with 'Too many open files'; raise it (ulimit "
                    "-n, or LimitNOFILE= in a systemd unit) or lower --concurrency",
                    concurrency, need, soft,
                    "unlimited" if hard == resource.RLIM_INFINITY else hard)


def _install_signal_handlers(worker: Worker) -> None:
    def on_signal(signum: int, _frame: object) -> None:
        if worker.stop.is_set() and signum == signal.SIGINT:
            os._exit(130)  # a second Ctrl-C: now (children die with us)
        log.info("got %s: stopping", signal.Signals(signum).name)
        worker.stop.set()
        # Runs may be on this very thread (--run): stop them from another one.
        threading.Thread(target=worker.stop_runs, name="stopper", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
