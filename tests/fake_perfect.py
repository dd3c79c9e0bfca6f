"""A faithful fake of the Perfect backend, over real HTTP on 127.0.0.1.

It implements every endpoint of /work/shared/perfect-api.md with the same
status codes, bodies and quirks (library entries consumed by runs, 404 for a
finished task, a run poisoned by an update without `state`, one global
heartbeat timestamp and its watchdog, the long poll handed to the oldest
waiter...). Tests drive it through a small Python API:

    with FakePerfect(poll_hold=2.0) as fake:
        client = PerfectAPIClient(fake.url)
        ...
        fake.wait_for(lambda: fake.run(run_id)["state"] == "COMPLETED")
        assert [r.path for r in fake.requests] == [...]

Cost model: like the real server, every write to a run (a log entry, a state
update, complete) rewrites the whole run in SQLite, one write at a time (Node's
single thread): each such request costs `extra + per_mb * size of the stored
run in MB` seconds, served one after the other. `set_cost(extra, per_mb)`
changes it; the default (no extra, 20 ms per MB) is the real server with no UI
open; `set_cost(0.3)` is one with a UI open on a large database (0.1-0.4 s).

Fault injection: `set_delay(pattern, seconds)`, `fail_with(pattern, status,
count=None)`, `respond_with(...)` for arbitrary answers (redirects, huge
bodies), `stop()` (connection refused) and `start()` again on the same port,
which behaves like a server restart: the in-memory execution queue is lost and
runs left RUNNING are failed, while runs themselves persist (SQLite).

A pattern is a path prefix, or an fnmatch glob when it contains "*".
Every request is recorded (method, path, parsed JSON body, headers, time,
status) before it is answered; `wait_for` waits on a condition variable that
every request and every watchdog action notifies.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import random
import re
import select
import socket
import string
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import pytest

T = TypeVar("T")
_ABORT = object()  # handler result: close the connection without answering
_FINAL = ("COMPLETED", "FAILED")
NOT_FOUND_BODY = {"success": False, "error": "Run or task not found"}


@dataclass
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    body: Any
    headers: dict[str, str]
    time: float
    raw: bytes = b""
    status: int | None = None
    cost: float = 0.0  # seconds the cost model held it (see set_cost)


@dataclass
class _Rule:
    pattern: str
    method: str | None
    seconds: float = 0.0
    status: int = 500
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    remaining: int | None = None

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        if "*" in self.pattern:
            return fnmatch.fnmatchcase(path, self.pattern)
        return path.startswith(self.pattern)


@dataclass
class _Waiter:
    item: bytes | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # aborted connections during stop() are expected


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like Express
    # Node's HTTP server turns Nagle off; with it on, headers and body written
    # separately wait ~40 ms for the client's delayed ACK on every request.
    disable_nagle_algorithm = True
    fake: FakePerfect

    def setup(self) -> None:
        super().setup()
        self.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.fake._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.fake._serve(self)

    do_POST = do_PUT = do_DELETE = do_GET


def _new_id(prefix: str) -> str:
    return prefix + "".join(random.choices(string.ascii_lowercase + string.digits, k=7))


def _now_ms() -> int:
    return int(time.time() * 1000)


class FakePerfect:
    """The fake backend. Use as a context manager; `.url` is its base URL."""

    def __init__(
        self,
        *,
        poll_hold: float = 30.0,
        watchdog_timeout: float = 10.0,
        watchdog_period: float = 1.0,
        port: int = 0,
        extra_cost: float = 0.0,
        cost_per_mb: float = 0.02,
    ) -> None:
        self.poll_hold = poll_hold
        self.extra_cost = extra_cost
        self.cost_per_mb = cost_per_mb
        self._db = threading.Lock()  # run writes are served one at a time
        self.watchdog_timeout = watchdog_timeout
        self.watchdog_period = watchdog_period
        self.port = port
        self._cond = threading.Condition()  # RLock inside: predicates may re-enter
        self._flows: list[dict[str, Any]] = []
        self._runs: dict[str, dict[str, Any]] = {}
        self._sparse: set[str] = set()
        self._reports: dict[str, dict[str, Any]] = {}
        self._html_pages: dict[str, str] = {}
        self._stats: dict[tuple[str, str], list[int]] = {}
        self._learned: dict[str, list[dict[str, Any]]] = {}
        self._queue: deque[bytes] = deque()
        self._waiters: list[_Waiter] = []
        self._last_hb: float | None = None
        self._requests: list[Recorded] = []
        self._delays: list[_Rule] = []
        self._faults: list[_Rule] = []
        self._conns: set[socket.socket] = set()
        self._generation = 0
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._closed = threading.Event()
        self._started_once = False
        self.watchdog_failures = 0
        self.crashed = False
        self.handler_errors: list[str] = []

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> FakePerfect:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> FakePerfect:
        """Start serving (again, on the same port: a restart loses the queue)."""
        with self._cond:
            if self._server is not None:
                return self
            if self._started_once:
                self._restart_effects()
            handler = type("Handler", (_Handler,), {"fake": self})
            self._server = _Server(("127.0.0.1", self.port), handler)
            self.port = self._server.server_address[1]
            self._started_once = True
            server = self._server
        self._serve_thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._serve_thread.start()
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watchdog_loop, daemon=True)
            self._watchdog.start()
        return self

    def stop(self) -> None:
        """Become unreachable: refuse connections, drop open ones and held polls."""
        with self._cond:
            server, self._server = self._server, None
            if server is None:
                return
            self._generation += 1
            self._cond.notify_all()
            conns = list(self._conns)
        server.shutdown()
        server.server_close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._serve_thread is not None:
            self._serve_thread.join(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._closed.set()
        if self._watchdog is not None:
            self._watchdog.join(5)

    def _restart_effects(self) -> None:
        """What a real restart does: memory lost, runs left RUNNING failed."""
        self._queue.clear()
        self._waiters.clear()
        self._last_hb = None
        for run in self._runs.values():
            if run["state"] == "RUNNING":
                self._fail_run(run, "Server was restarted")
        self._cond.notify_all()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # -- test API: inspection ------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        with self._cond:
            return list(self._requests)

    def requests_to(self, pattern: str, method: str | None = None) -> list[Recorded]:
        rule = _Rule(pattern, method)
        return [r for r in self.requests if rule.matches(r.method, r.path)]

    @property
    def runs(self) -> dict[str, dict[str, Any]]:
        with self._cond:
            return copy.deepcopy(self._runs)

    def run(self, run_id: str) -> dict[str, Any]:
        with self._cond:
            return copy.deepcopy(self._runs[run_id])

    def logs(self, run_id: str) -> list[str]:
        with self._cond:
            return list(self._runs[run_id]["logs"])

    @property
    def flows(self) -> list[dict[str, Any]]:
        with self._cond:
            return copy.deepcopy(self._flows)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def waiting_pollers(self) -> int:
        with self._cond:
            return len(self._waiters)

    @property
    def last_heartbeat(self) -> float | None:
        with self._cond:
            return self._last_hb

    def is_poisoned(self, run_id: str) -> bool:
        with self._cond:
            run = self._runs.get(run_id)
            return run is not None and self._save_error(run) is not None

    def is_sparse(self, run_id: str) -> bool:
        with self._cond:
            return run_id in self._sparse

    def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0) -> T:
        """Wait until `predicate()` is truthy (re-checked on every server event)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"condition not met within {timeout}s")
                # Capped so predicates over state outside the fake are re-checked too.
                self._cond.wait(min(remaining, 0.05))

    # -- test API: driving ---------------------------------------------------

    def set_last_heartbeat(self, value: float | None) -> None:
        """Seed the global heartbeat time (monotonic seconds, or None = never seen)."""
        with self._cond:
            self._last_hb = value

    def trigger(self, flow: str, configuration: str = "development") -> str:
        """The UI's Trigger button: by flow id, or the newest library entry of that name."""
        with self._cond:
            entry = self._find_flow(flow)
            if entry is None:
                raise KeyError(f"no library entry {flow!r}")
            run = self._create_run(entry, configuration)
            self._enqueue(self._request_body(run))
            return run["id"]

    def queue_raw(self, body: Any) -> None:
        """Queue an execution request exactly as given (bytes) or JSON-encoded."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        with self._cond:
            self._enqueue(raw)

    def set_cost(self, extra: float = 0.0, per_mb: float = 0.02) -> None:
        """Each run write costs `extra + per_mb * stored run MB` seconds, one at a time."""
        with self._cond:
            self.extra_cost, self.cost_per_mb = extra, per_mb

    def run_size(self, run_id: str) -> int:
        """Bytes of the stored run, roughly as SQLite holds it (logs and task rows)."""
        with self._cond:
            run = self._runs.get(run_id)
            if run is None:
                return 0
            logs = sum(len(line) for line in run["logs"] if isinstance(line, str))
            return logs + 400 * len(run["tasks"])

    def set_delay(self, pattern: str, seconds: float, method: str | None = None) -> None:
        """Answer matching requests `seconds` late (0 removes the delay)."""
        with self._cond:
            self._delays = [d for d in self._delays if (d.pattern, d.method) != (pattern, method)]
            if seconds > 0:
                self._delays.append(_Rule(pattern, method, seconds=seconds))

    def fail_with(
        self, pattern: str, status: int, count: int | None = None, method: str | None = None
    ) -> None:
        """Answer the next `count` (None: all) matching requests with `status`."""
        body = {"success": False, "error": f"injected {status}"}
        self.respond_with(pattern, status, body, count=count, method=method)

    def respond_with(
        self,
        pattern: str,
        status: int,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        count: int | None = None,
        method: str | None = None,
    ) -> None:
        """Answer matching requests with a canned response instead of handling them."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        rule = _Rule(pattern, method, status=status, body=raw,
                     headers=dict(headers or {}), remaining=count)
        with self._cond:
            self._faults.append(rule)

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()
            self._delays.clear()

    # -- HTTP plumbing -------------------------------------------------------

    def _serve(self, h: _Handler) -> None:
        try:
            self._serve_one(h)
        except OSError:
            h.close_connection = True
        except Exception:  # a fake bug must show up in the test, not as a hang-up
            self.handler_errors.append(traceback.format_exc())
            self._write(h, 500, {"success": False, "error": "fake server bug"}, {})

    def _serve_one(self, h: _Handler) -> None:
        with self._cond:
            generation = self._generation
        raw = self._read_body(h)
        split = urlsplit(h.path)
        rec = Recorded(h.command, split.path, _parse(raw), dict(h.headers.items()),
                       time.monotonic(), raw)
        with self._cond:
            self._requests.append(rec)
            self._cond.notify_all()
        if not self._delay(rec, generation):
            return self._abort(h)
        run_id = _written_run(rec)
        if run_id is None:
            status, body, headers = self._answer(h, rec, generation)
        else:
            with self._db:  # one run write at a time, each as slow as its run is big
                if not self._charge(rec, run_id, generation):
                    return self._abort(h)
                status, body, headers = self._answer(h, rec, generation)
        if body is _ABORT:
            return self._abort(h)
        with self._cond:
            rec.status = status
            self._cond.notify_all()
        self._write(h, status, body, headers)

    def _answer(
        self, h: _Handler, rec: Recorded, generation: int
    ) -> tuple[int, Any, dict[str, str]]:
        fault = self._take_fault(rec)
        if fault is not None:
            return fault.status, fault.body, fault.headers
        body = _express_body(h.headers.get("Content-Type", ""), rec.raw)
        if body is _BAD_JSON:  # express.json()'s error, through Express's default handler
            return 400, _Html(_BAD_JSON_PAGE), {}
        if rec.method == "GET" and rec.path == "/api/execution-requests":
            return 200, self._poll(h, generation), {}
        with self._cond:
            if self._generation != generation:
                return 0, _ABORT, {}
            status, answer = self._route(rec, body)
            self._cond.notify_all()
            return status, answer, {}

    def _read_body(self, h: _Handler) -> bytes:
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length) if length else b""

    def _delay(self, rec: Recorded, generation: int) -> bool:
        """Hold the request for its configured delay; False if the server stopped meanwhile."""
        with self._cond:
            rule = next((d for d in self._delays if d.matches(rec.method, rec.path)), None)
            return rule is None or self._hold(rule.seconds, generation)

    def _charge(self, rec: Recorded, run_id: str, generation: int) -> bool:
        """Hold a run write for its cost; False if the server stopped meanwhile."""
        with self._cond:
            rec.cost = self.extra_cost + self.cost_per_mb * self.run_size(run_id) / 2**20
            return self._hold(rec.cost, generation)

    def _hold(self, seconds: float, generation: int) -> bool:
        """Wait `seconds` (lock held); False if the server stopped meanwhile."""
        deadline = time.monotonic() + seconds
        while self._generation == generation:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            self._cond.wait(remaining)
        return False

    def _take_fault(self, rec: Recorded) -> _Rule | None:
        with self._cond:
            for rule in self._faults:
                if rule.matches(rec.method, rec.path):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining <= 0:
                            self._faults.remove(rule)
                    return rule
        return None

    def _write(self, h: _Handler, status: int, body: Any, headers: dict[str, str]) -> None:
        if isinstance(body, bytes):
            data, ctype = body, "application/json; charset=utf-8"
        elif isinstance(body, _Html):
            data, ctype = body.text.encode(), "text/html; charset=utf-8"
        else:
            data, ctype = json.dumps(body).encode(), "application/json; charset=utf-8"
        try:
            h.send_response(status)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(data)))
            h.send_header("Access-Control-Allow-Origin", "*")
            for key, value in headers.items():
                h.send_header(key, value)
            h.end_headers()
            h.wfile.write(data)
            h.wfile.flush()
        except OSError:
            h.close_connection = True

    def _abort(self, h: _Handler) -> None:
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- routing (lock held) -------------------------------------------------

    _ROUTES: list[tuple[str, re.Pattern[str], str]] = [
        ("POST", re.compile(r"/api/flows"), "_register"),
        ("GET", re.compile(r"/api/engine/flows"), "_list_flows"),
        ("POST", re.compile(r"/api/engine/trigger/([^/]+)"), "_trigger"),
        ("POST", re.compile(r"/api/engine/run/([^/]+)"), "_client_run"),
        ("POST", re.compile(r"/api/runs/([^/]+)/tasks/([^/]+)/state"), "_state"),
        ("POST", re.compile(r"/api/flows/([^/]+)/logs"), "_log"),
        ("POST", re.compile(r"/api/runs/([^/]+)/complete"), "_complete"),
        ("POST", re.compile(r"/api/heartbeat"), "_heartbeat"),
        ("POST", re.compile(r"/api/client/stop"), "_client_stop"),
        ("GET", re.compile(r"/api/engine/runs"), "_list_runs"),
        ("GET", re.compile(r"/api/reports/run/([^/]+)"), "_run_report"),
        ("GET", re.compile(r"/api/reports/flow/([^/]+)"), "_flow_reports"),
        ("DELETE", re.compile(r"/api/runs/([^/]+)"), "_delete_run"),
        ("GET", re.compile(r"(/Reports/.+)"), "_report_html"),
    ]

    def _route(self, rec: Recorded, body: Any) -> tuple[int, Any]:
        for method, regex, name in self._ROUTES:
            match = regex.fullmatch(rec.path)
            if method == rec.method and match:
                args = [unquote(g) for g in match.groups()]
                return getattr(self, name)(body, *args)
        return 404, _Html(f"Cannot {rec.method} {rec.path}")

    def _register(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) \
                or not isinstance(body.get("tasks"), list):
            return 400, {"success": False, "error": "Invalid flow definition: name and tasks "
                                                    "are required"}
        name = body["name"]
        tasks = [self._library_task(name, i, t) for i, t in enumerate(body["tasks"])]
        total = sum(t["estimatedTime"] for t in tasks)
        for task in tasks:  # the server's weights: each task's share of the estimates
            task["weight"] = task["estimatedTime"] / total if total else 1 / len(tasks)
        entry = {
            "id": _new_id("flow-"),
            "name": name,
            "description": body.get("description", ""),
            "codeSnippet": "",
            "tags": body.get("tags") or {},
            "tasks": tasks,
            "createdAt": _now_ms(),
        }
        self._flows.append(entry)
        result = copy.deepcopy(entry)  # the real answer has no autoTrigger fields
        if body.get("autoTrigger") is True:
            config = body.get("autoTriggerConfig") or "development"
            run = self._create_run(entry, config)
            self._enqueue(self._request_body(run))
        return 200, {"success": True, "flow": result}

    def _library_task(self, flow: str, index: int, task: Any) -> dict[str, Any]:
        task = task if isinstance(task, dict) else {}
        name = task.get("name", f"task_{index}")
        estimate = task.get("estimatedTime") or 1000
        measured = self._stats.get((flow, name), [])
        if len(measured) >= 2:
            estimate = int(sum(measured) / len(measured))
        return {
            "id": _new_id("task-"),
            "name": name,
            "description": task.get("description") or "Registered task",
            "estimatedTime": estimate,
            "crucialPass": task.get("crucialPass", True) is not False,
        }

    def _list_flows(self, body: Any) -> tuple[int, Any]:
        return 200, copy.deepcopy(self._flows)

    def _trigger(self, body: Any, flow_id: str) -> tuple[int, Any]:
        entry = self._find_flow(flow_id, by_name=False)
        if entry is None:
            return 200, {"success": True}  # quirk: runId undefined, still success
        run = self._create_run(entry, _configuration(body))
        self._enqueue(self._request_body(run))
        return 200, {"success": True, "runId": run["id"]}

    def _client_run(self, body: Any, flow_id: str) -> tuple[int, Any]:
        entry = self._find_flow(flow_id, by_name=False)
        if entry is None:
            return 200, {"success": True}  # quirk: no runId, still success
        run = self._create_run(entry, _configuration(body))
        return 200, {"success": True, "runId": run["id"]}

    def _state(self, body: Any, run_id: str, index_text: str) -> tuple[int, Any]:
        # The real handler changes the run in memory first, then saves the whole run to
        # SQLite; a save that fails answers 400 but the in-memory change stays.
        run = self._runs.get(run_id)
        if run is None:
            return 404, NOT_FOUND_BODY
        body = body if isinstance(body, dict) else {}
        index = _parse_int(index_text)
        if index is None or index < 0:
            return 200, {"success": True}  # parseInt: NaN/-1 hit no array slot; nothing seen
        task = self._task_at(run, index, body)
        name = body.get("taskName")
        if isinstance(name, str) and name and name != task["taskName"]:
            task["taskName"] = name  # renamed even when the answer below is 404
        if "crucialPass" in body and body["crucialPass"] is not None:
            task["crucialPass"] = body["crucialPass"]
        if task["state"] in _FINAL:
            return 404, NOT_FOUND_BODY
        self._apply_state(run, task, body)
        return self._saved(run)

    def _task_at(self, run: dict[str, Any], index: int, body: dict[str, Any]) -> dict[str, Any]:
        tasks = run["tasks"]
        if index < len(tasks):
            return tasks[index]
        crucial = body.get("crucialPass")
        task = _run_task({
            "name": body.get("taskName") or f"Task {index + 1}",
            "estimatedTime": self._estimate(run["flowName"], body.get("taskName"))
            or body.get("estimatedTime") or 1000,
        })
        task["crucialPass"] = crucial if crucial is not None else True
        if index > len(tasks):
            # A skipped index: the server fills the gap with the SAME task object, so
            # the run holds duplicate task ids and every later save of it fails.
            self._sparse.add(run["id"])
        while len(tasks) <= index:
            tasks.append(task)
        return task

    def _estimate(self, flow: str, task_name: Any) -> int | None:
        measured = self._stats.get((flow, task_name), []) if isinstance(task_name, str) else []
        return round(sum(measured) / len(measured)) if measured else None

    def _apply_state(self, run: dict[str, Any], task: dict[str, Any], body: dict) -> None:
        state = body.get("state")
        state = state.upper() if isinstance(state, str) else None  # None: `undefined`
        task["state"] = state
        if body.get("durationMs") is not None:
            task["durationMs"] = body["durationMs"]
        if "result" in body and body["result"] is not None:
            task["result"] = body["result"]
        if state == "RUNNING":  # RETRYING is stored as is: no start time, no progress
            self._running_progress(task, body)
        elif state in _FINAL:
            task["endTime"] = _now_ms()
            if state == "COMPLETED":
                task["progress"] = 100
                duration = task["durationMs"]
                if duration is None and task["startTime"] is not None:
                    duration = _now_ms() - task["startTime"]
                if isinstance(duration, int | float):
                    key = (run["flowName"], task["taskName"])
                    self._stats.setdefault(key, []).append(int(duration))
        # Checked after every accepted update: any crucial FAILED task fails the run.
        if any(t["state"] == "FAILED" and t["crucialPass"] is not False for t in run["tasks"]):
            run["state"] = "FAILED"
            run["endTime"] = _now_ms()
            if not run["reportPath"]:
                self._write_report(run)

    def _running_progress(self, task: dict[str, Any], body: dict[str, Any]) -> None:
        now = _now_ms()
        if task["startTime"] is None:
            task["startTime"] = now
        task["runningUpdates"] = task.get("runningUpdates", 0) + 1
        estimate = task["estimatedTime"] or 0
        if estimate:
            task["progress"] = min(99, round((now - task["startTime"]) / estimate * 100))
        else:
            progress = body.get("progress")
            task["progress"] = progress if progress is not None else 50

    def _save_error(self, run: dict[str, Any]) -> str | None:
        """Why the real server's SQLite save of this run would fail (None: it saves)."""
        seen: set[int] = set()
        for task in run["tasks"]:
            if task["state"] is None:
                return "NOT NULL constraint failed: task_runs.state"
            if id(task) in seen:
                return "UNIQUE constraint failed: task_runs.id"
            seen.add(id(task))
        if any(line is None for line in run["logs"]):
            return "NOT NULL constraint failed: logs.log_entry"
        return None

    def _saved(self, run: dict[str, Any]) -> tuple[int, Any]:
        error = self._save_error(run)
        if error is not None:
            return 400, {"success": False, "error": error}
        return 200, {"success": True}

    def _log(self, body: Any, run_id: str) -> tuple[int, Any]:
        run = self._runs.get(run_id)
        if run is None:  # unknown runs: accepted and dropped
            return 200, {"success": True}
        line = body.get("log") if isinstance(body, dict) else None
        run["logs"].append(line)  # a missing `log` is stored as undefined: run unsaveable
        return self._saved(run)

    def _complete(self, body: Any, run_id: str) -> tuple[int, Any]:
        run = self._runs.get(run_id)
        if run is None:
            return 404, {"success": False, "error": "Run not found"}
        count = body.get("taskCount") if isinstance(body, dict) else None
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            del run["tasks"][count:]  # also on a FAILED run
        tasks = run["tasks"]
        finished = all(t["state"] in _FINAL for t in tasks)
        crucial_failed = any(t["state"] == "FAILED" and t["crucialPass"] is not False
                             for t in tasks)
        if finished and not crucial_failed:
            # Even a run already FAILED (by Stop or the watchdog, on a non-crucial task)
            # becomes COMPLETED here.
            run["state"] = "COMPLETED"
            run["progress"] = 100
            run["endTime"] = run["endTime"] or _now_ms()
            if not run["reportPath"]:
                self._write_report(run)
            self._learned[run["flowName"]] = [
                {"name": t["taskName"], "estimatedTime": t["durationMs"] or t["estimatedTime"]}
                for t in tasks
            ]
        elif crucial_failed:
            run["state"] = "FAILED"
            run["endTime"] = run["endTime"] or _now_ms()
            if not run["reportPath"]:
                self._write_report(run)
        return self._saved(run)

    def _heartbeat(self, body: Any) -> tuple[int, Any]:
        self._last_hb = time.monotonic()
        return 200, {"success": True}

    def _client_stop(self, body: Any) -> tuple[int, Any]:
        """The UI's Stop (no client process started by this server): every RUNNING or
        PENDING run FAILED at once, but only its RUNNING tasks; PENDING ones stay."""
        for run in self._runs.values():
            if run["state"] in ("RUNNING", "PENDING"):
                self._fail_run(run, "User stopped the client", states=("RUNNING",))
        return 200, {"success": True, "message": "Client already stopped", "status": "stopped"}

    def _list_runs(self, body: Any) -> tuple[int, Any]:
        return 200, [copy.deepcopy(r) for r in reversed(self._runs.values())]

    def _run_report(self, body: Any, run_id: str) -> tuple[int, Any]:
        if run_id not in self._runs:
            return 404, {"success": False, "error": "Run not found"}
        report = self._reports.get(run_id)
        if report is None:
            return 404, {"success": False, "error": "No report exists for this run"}
        return 200, {"success": True, "report": copy.deepcopy(report)}

    def _flow_reports(self, body: Any, flow_name: str) -> tuple[int, Any]:
        reports = [r for r in self._reports.values() if r["flowName"] == flow_name]
        return 200, {"success": True, "flowName": flow_name, "reports": copy.deepcopy(reports)}

    def _delete_run(self, body: Any, run_id: str) -> tuple[int, Any]:
        run = self._runs.get(run_id)
        if run is None or run["state"] in ("RUNNING", "PENDING"):
            return 404, {"success": False, "error": "Run not found or is currently running"}
        del self._runs[run_id]
        return 200, {"success": True}

    def _report_html(self, body: Any, path: str) -> tuple[int, Any]:
        html = self._html_pages.get(path)
        return (200, _Html(html)) if html else (404, _Html(f"Cannot GET {path}"))

    # -- model (lock held) ---------------------------------------------------

    def _find_flow(self, key: str, by_name: bool = True) -> dict[str, Any] | None:
        for entry in self._flows:
            if entry["id"] == key:
                return entry
        if by_name:
            for entry in reversed(self._flows):
                if entry["name"] == key:
                    return entry
        return None

    def _create_run(self, entry: dict[str, Any], configuration: str) -> dict[str, Any]:
        # A task list learned from an earlier COMPLETED run of that name wins over
        # the registered one.
        planned = self._learned.get(entry["name"]) or entry["tasks"]
        run_id = _new_id("run-")
        while run_id in self._runs:
            run_id = _new_id("run-")
        run = {
            "id": run_id,
            "flowId": entry["id"],
            "flowName": entry["name"],
            "description": entry.get("description", ""),
            "tags": copy.deepcopy(entry.get("tags", {})),
            "configuration": configuration,
            "state": "RUNNING",
            "progress": 0,
            "logs": [],
            "tasks": [_run_task(t) for t in planned],
            "startTime": _now_ms(),
            "endTime": None,
            "reportPath": None,
        }
        self._runs[run_id] = run
        self._flows.remove(entry)  # quirk: a run consumes its library entry
        return run

    def _request_body(self, run: dict[str, Any]) -> bytes:
        body = {"run_id": run["id"], "flow_name": run["flowName"],
                "configuration": run["configuration"]}
        return json.dumps(body).encode()

    def _enqueue(self, raw: bytes, front: bool = False) -> None:
        if self._waiters:
            self._waiters.pop(0).item = raw  # the oldest waiting poller gets it
        elif front:
            self._queue.appendleft(raw)
        else:
            self._queue.append(raw)
        self._cond.notify_all()

    def _poll(self, h: _Handler, generation: int) -> Any:
        with self._cond:
            self._last_hb = time.monotonic()  # a poll's arrival counts as a heartbeat
            if self._queue:
                return self._queue.popleft()
            waiter = _Waiter()
            self._waiters.append(waiter)
            deadline = time.monotonic() + self.poll_hold
            while waiter.item is None:
                remaining = deadline - time.monotonic()
                if self._generation != generation or _disconnected(h.connection):
                    self._drop_waiter(waiter)
                    return _ABORT
                if remaining <= 0:
                    self._drop_waiter(waiter)
                    return b"null"
                self._cond.wait(min(remaining, 0.05))
            if _disconnected(h.connection):
                # Node learns of a closed poll at once and never hands it a request; we
                # look every 50 ms, so give back what reached a poller already gone.
                self._enqueue(waiter.item, front=True)
                return _ABORT
            return waiter.item

    def _drop_waiter(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _end_run(self, run: dict[str, Any], state: str) -> None:
        run["state"] = state
        run["endTime"] = _now_ms()
        if state == "COMPLETED":
            run["progress"] = 100
        self._write_report(run)

    def _fail_run(self, run: dict[str, Any], reason: str, *, link_report: bool = True,
                  states: tuple[str, ...] = ("RUNNING", "PENDING")) -> None:
        """The server failing a run itself: restart, watchdog, the UI's Stop."""
        for task in run["tasks"]:
            if task["state"] in states:
                task["state"] = "FAILED"
                task["endTime"] = _now_ms()
                task["logs"].append(f"[System] Task failed: {reason}")
        run["logs"].append(f"[System] Flow failed: {reason}")
        run["state"] = "FAILED"
        run["endTime"] = _now_ms()
        if not link_report:
            # The watchdog writes the HTML file but never stores its path on the run:
            # GET /api/reports/run/{id} answers 404 for such a run.
            self._report_page(run)
        elif not run["reportPath"]:
            self._write_report(run)

    def _report_page(self, run: dict[str, Any]) -> str:
        folder = run["flowName"].replace(" ", "_")
        url = f"/Reports/{folder}/{run['id']}.html"
        html = f"<html><body><h1>{run['flowName']}</h1><p>{run['state']}</p></body></html>"
        self._html_pages[url] = html
        return url

    def _write_report(self, run: dict[str, Any]) -> None:
        url = self._report_page(run)
        self._reports[run["id"]] = {
            "runId": run["id"], "flowName": run["flowName"], "url": url,
            "path": url.lstrip("/"), "size": len(self._html_pages[url]),
            "createdAt": _now_ms(),
        }
        run["reportPath"] = url.lstrip("/")

    def _watchdog_loop(self) -> None:
        while not self._closed.wait(self.watchdog_period):
            with self._cond:
                crashed = self._server is not None and self._watchdog_check()
            if crashed:
                self.crashed = True
                self.stop()

    def _watchdog_check(self) -> bool:
        """Fail stale runs; True when the real server would have crashed instead."""
        last = self._last_hb
        if last is None or time.monotonic() - last <= self.watchdog_timeout:
            return False
        failed = 0
        for run in self._runs.values():
            if run["state"] not in ("RUNNING", "PENDING"):
                continue
            # The real watchdog saves each run it fails; a run SQLite cannot hold (an
            # `undefined` state or log line, duplicate task rows) throws in its timer
            # and the whole server process dies.
            self._fail_run(run, "Lost connection to Python client", link_report=False)
            if self._save_error(run) is not None:
                return True
            failed += 1
        if failed:
            self._last_hb = None  # forgotten only when something was failed
            self.watchdog_failures += failed
            self._cond.notify_all()
        return False


@dataclass
class _Html:
    text: str


def _run_task(task: dict[str, Any]) -> dict[str, Any]:
    return {
        "taskName": task.get("name"),
        "description": task.get("description", ""),
        "state": "PENDING",
        "progress": 0,
        "durationMs": None,
        "result": None,
        "crucialPass": None,  # unknown until the client sends it; None counts as crucial
        "estimatedTime": task.get("estimatedTime", 1000),
        "startTime": None,
        "endTime": None,
        "logs": [],
    }


def _configuration(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("configuration"), str):
        return body["configuration"]
    return "development"


_BAD_JSON = object()
_BAD_JSON_PAGE = ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                  '<title>Error</title>\n</head>\n<body>\n<pre>SyntaxError: invalid JSON'
                  '</pre>\n</body>\n</html>\n')


_WRITES = re.compile(r"/api/(?:flows/([^/]+)/logs|runs/([^/]+)/(?:tasks/[^/]+/state|complete))")


def _written_run(rec: Recorded) -> str | None:
    """The run a request rewrites in the real server's database (None: not a run write)."""
    match = _WRITES.fullmatch(rec.path) if rec.method == "POST" else None
    return unquote(match.group(1) or match.group(2)) if match else None


def _parse_int(text: str) -> int | None:
    """JavaScript's parseInt(text, 10): leading digits, else None (NaN)."""
    match = re.match(r"\s*([+-]?\d+)", text)
    return int(match.group(1)) if match else None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse(raw: bytes) -> Any:
    """The body as strict JSON (NaN/Infinity refused, like JSON.parse), else the bytes."""
    if not raw:
        return None
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError:
        return raw


def _express_body(content_type: str, raw: bytes) -> Any:
    """What express.json() leaves in req.body: {} unless the body is declared JSON."""
    if "json" not in content_type.lower() or not raw:
        return {}
    parsed = _parse(raw)
    if not isinstance(parsed, dict | list):  # strict mode: objects and arrays only
        return _BAD_JSON
    return parsed


def _disconnected(conn: socket.socket) -> bool:
    """A held poller closed its side (readable with EOF)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


@pytest.fixture
def fake_perfect() -> Iterator[FakePerfect]:
    """A running fake backend with the real server's timings (30 s hold, 10 s watchdog)."""
    with FakePerfect() as fake:
        yield fake


@pytest.fixture
def quick_fake() -> Iterator[FakePerfect]:
    """A fake with a 1 s poll hold, for tests that exercise the empty long poll."""
    with FakePerfect(poll_hold=1.0) as fake:
        yield fake
