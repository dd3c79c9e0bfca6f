"""HTTP client for the Perfect backend (the wire protocol of perfect-api.md).

Every call is one HTTP request with explicit (connect, read) timeouts, no
redirects followed, and a response body read with a size cap. A call never
raises for a backend fault; it returns an `ApiResult` whose `status` says what
the caller should do:

- OK            2xx: delivered.
- NOT_FOUND     404: the run (or the task) is unknown to the backend, or the
                task is already COMPLETED/FAILED ("run no longer wanted").
- CLIENT_ERROR  other 3xx/4xx: the backend refused this item; retrying the
                same bytes cannot help. `body` holds what it said.
- RETRYABLE     5xx, connection refused/reset, timeout: try again later.

Sessions are per thread (`requests.Session` is not thread-safe), so one client
object may be shared by the sender threads, the poll thread and the heartbeat
thread. The optional bearer token is sent on every request and never logged;
`repr()` masks it.

JSON bodies are always valid JSON: `json_safe` converts NaN/Infinity and
values JSON cannot hold before anything is sent.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests
import urllib3

from ..jsonsafe import json_safe
from ..names import MAX_NAME_LEN, name_problem

log = logging.getLogger("perfect_runner.transport")

DEFAULT_MAX_BODY = 1024 * 1024
MAX_ID_LEN = MAX_NAME_LEN  # ids and flow names share one rule: perfect_runner.names


class ApiStatus(enum.Enum):
    OK = "ok"
    NOT_FOUND = "not_found"
    CLIENT_ERROR = "client_error"
    RETRYABLE = "retryable"


@dataclass(frozen=True)
class ApiResult:
    """The outcome of one request: a status class, the HTTP code and the parsed body."""

    status: ApiStatus
    http_status: int | None = None
    body: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is ApiStatus.OK

    def describe(self) -> str:
        """A one-line summary for logs (never contains request headers)."""
        code = f"HTTP {self.http_status}" if self.http_status is not None else "no answer"
        detail = self.error or _short(self.body)
        return f"{code}: {detail}" if detail else code


class ApiError(RuntimeError):
    """A call whose caller needs a value (create_run, poll_once...) did not get one."""

    def __init__(self, result: ApiResult) -> None:
        super().__init__(result.describe())
        self.result = result


class BadRequest(ValueError):
    """The backend sent an execution request the runner cannot accept.

    `run_id` is set when the request named a valid run: that run can (and must)
    be reported FAILED with the reason, else it stays RUNNING on the backend.
    """

    def __init__(self, message: str, run_id: str | None = None,
                 flow_name: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.flow_name = flow_name


def _short(value: Any, limit: int = 300) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


# -- JSON safety -------------------------------------------------------------


def dumps(payload: Any) -> bytes:
    """Serialise to strict JSON (no NaN), converting what JSON cannot hold."""
    return json.dumps(json_safe(payload), allow_nan=False).encode("utf-8")


# -- execution requests ------------------------------------------------------


@dataclass(frozen=True)
class ExecutionRequest:
    """One unit of work handed out by GET /api/execution-requests."""

    run_id: str
    flow_name: str
    configuration: str = "development"

    @classmethod
    def from_json(cls, data: Any) -> ExecutionRequest:
        """Validate what the backend sent; raise `BadRequest` when it is malformed."""
        if not isinstance(data, dict):
            raise BadRequest(f"execution request is not a JSON object: {_short(data, 80)!r}")
        run_id = _checked_text(data, "run_id")
        flow_name = None
        try:
            flow_name = _checked_text(data, "flow_name")
            # The UI may trigger without a configuration; Express then omits the key.
            # Missing means the server default rather than a malformed request.
            configuration = data.get("configuration")
            if configuration is None:
                configuration = "development"
            else:
                configuration = _checked_text(data, "configuration", allow_empty=True)
        except BadRequest as exc:
            raise BadRequest(str(exc), run_id=run_id, flow_name=flow_name) from None
        return cls(run_id=run_id, flow_name=flow_name, configuration=configuration)


def _checked_text(data: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    if key not in data:
        raise BadRequest(f"execution request field {key!r} is missing")
    value = data[key]
    if not isinstance(value, str):
        raise BadRequest(f"execution request field {key!r} is not a string: {_short(value, 80)!r}")
    if not value and not allow_empty:
        raise BadRequest(f"execution request field {key!r} is empty")
    problem = name_problem(value)
    if problem:
        raise BadRequest(f"execution request field {key!r} {problem}")
    return value


# -- the client --------------------------------------------------------------


class PerfectAPIClient:
    """Talks to one Perfect backend. Thread-safe: each thread gets its own session."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        verify: bool | str = True,
        connect_timeout: float = 5.0,
        read_timeout: float = 15.0,
        poll_read_timeout: float = 40.0,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.verify = verify
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        # The server holds a poll for 30 s; the read timeout must outlast that hold.
        self.poll_read_timeout = poll_read_timeout
        self.max_body = max_body
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def __repr__(self) -> str:
        token = "***" if self._token else None
        return f"PerfectAPIClient({self.base_url!r}, token={token!r})"

    # -- endpoints -----------------------------------------------------------

    def register_flow(self, flow_definition: dict[str, Any]) -> ApiResult:
        """POST /api/flows. On OK, `result.body["flow"]["id"]` is the new library entry."""
        return self.request("POST", "/api/flows", flow_definition)

    def trigger(self, flow_id: str, configuration: str = "development") -> str | None:
        """POST /api/engine/trigger/{flowId}: the server queues the run; returns its runId."""
        result = self.request(
            "POST", f"/api/engine/trigger/{_seg(flow_id)}", {"configuration": configuration}
        )
        return _run_id_of(result)

    def create_run(self, flow_id: str, configuration: str = "development") -> str | None:
        """POST /api/engine/run/{flowId}: a run this client executes itself.

        Returns the runId, or None when the backend answered 200 without one
        (an unknown or already consumed flowId). Raises `ApiError` on failure.
        """
        result = self.request(
            "POST", f"/api/engine/run/{_seg(flow_id)}", {"configuration": configuration}
        )
        return _run_id_of(result)

    def send_log(self, run_id: str, log_message: str) -> ApiResult:
        """POST /api/flows/{runId}/logs with one entry (may hold several lines)."""
        return self.request("POST", f"/api/flows/{_seg(run_id)}/logs", {"log": log_message})

    def update_task_state(
        self,
        run_id: str,
        task_index: int,
        state: str,
        progress: int | None = None,
        *,
        duration_ms: int | None = None,
        result: dict[str, Any] | None = None,
        task_name: str | None = None,
        estimated_time: int | None = None,
        crucial_pass: bool | None = None,
    ) -> ApiResult:
        """POST /api/runs/{runId}/tasks/{taskIndex}/state."""
        payload = state_payload(
            state,
            progress=progress,
            duration_ms=duration_ms,
            result=result,
            task_name=task_name,
            estimated_time=estimated_time,
            crucial_pass=crucial_pass,
        )
        return self.post_state(run_id, task_index, payload)

    def post_state(self, run_id: str, task_index: int, payload: dict[str, Any]) -> ApiResult:
        """Send a prepared state payload; refuses (locally) one without a valid `state`."""
        if not isinstance(payload.get("state"), str) or not payload["state"]:
            # The server would store undefined and poison the whole run.
            raise ValueError("a state update needs a 'state'")
        if not isinstance(task_index, int) or task_index < 0:
            raise ValueError(f"bad task index {task_index!r}")
        return self.request("POST", f"/api/runs/{_seg(run_id)}/tasks/{task_index}/state", payload)

    def complete_flow(self, run_id: str, task_count: int) -> ApiResult:
        """POST /api/runs/{runId}/complete with the number of tasks actually called."""
        return self.request("POST", f"/api/runs/{_seg(run_id)}/complete", {"taskCount": task_count})

    def send_heartbeat(self, timeout: tuple[float, float] | None = None) -> ApiResult:
        """POST /api/heartbeat (empty body)."""
        return self.request("POST", "/api/heartbeat", None, timeout=timeout)

    def poll_once(self) -> ExecutionRequest | None:
        """One long poll: an `ExecutionRequest`, or None when the hold ended empty.

        Raises `BadRequest` for a malformed request (log it and poll again) and
        `ApiError` when the backend could not be asked (back off, then retry).
        """
        timeout = (self.connect_timeout, self.poll_read_timeout)
        result = self.request("GET", "/api/execution-requests", timeout=timeout)
        if not result.ok:
            raise ApiError(result)
        if result.error:
            raise BadRequest(f"execution request unreadable: {result.error}")
        if result.body is None:
            return None
        return ExecutionRequest.from_json(result.body)

    def listen_for_executions(
        self,
        handler: Callable[[ExecutionRequest], None],
        stop: threading.Event,
        poll_interval: float = 1.0,
        max_backoff: float = 10.0,
    ) -> None:
        """Long-poll until `stop` is set, handing each valid request to `handler`.

        `handler` must return quickly (start the run elsewhere). Backend faults
        back off from `poll_interval` to `max_backoff`; each outage is logged once.
        """
        delay = poll_interval
        down = False
        while not stop.is_set():
            try:
                request = self.poll_once()
            except BadRequest as exc:
                log.error("ignoring a malformed execution request: %s", exc)
                continue
            except ApiError as exc:
                if not down:
                    log.warning("cannot poll the Perfect backend (%s); retrying", exc)
                    down = True
                stop.wait(delay)
                delay = min(max_backoff, delay * 2)
                continue
            if down:
                log.info("polling the Perfect backend again")
                down = False
            delay = poll_interval
            if request is not None:
                handler(request)

    def list_flows(self) -> ApiResult:
        """GET /api/engine/flows (the library)."""
        return self.request("GET", "/api/engine/flows")

    def get_report(self, run_id: str) -> dict[str, Any] | None:
        """GET /api/reports/run/{runId}: the report object, or None when there is none."""
        result = self.request("GET", f"/api/reports/run/{_seg(run_id)}")
        if result.status is ApiStatus.NOT_FOUND:
            return None
        if not result.ok or not isinstance(result.body, dict):
            raise ApiError(result)
        report = result.body.get("report")
        return report if isinstance(report, dict) else None

    def close(self) -> None:
        """Close every thread's session (pooled connections)."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def close_thread_session(self) -> None:
        """Close the calling thread's session (a thread that ends should call this)."""
        session = getattr(self._local, "session", None)
        if session is None:
            return
        self._local.session = None
        with self._sessions_lock:
            if session in self._sessions:
                self._sessions.remove(session)
        session.close()

    # -- plumbing ------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        timeout: tuple[float, float] | None = None,
    ) -> ApiResult:
        """One request; never raises for network or HTTP faults."""
        headers = {"Accept": "application/json"}
        data = None
        if payload is not None:
            data = dumps(payload)
            headers["Content-Type"] = "application/json"
        elif method == "POST":
            data = b""
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            response = self._session().request(
                method,
                self.base_url + path,
                data=data,
                headers=headers,
                timeout=timeout or (self.connect_timeout, self.read_timeout),
                allow_redirects=False,
                stream=True,
                verify=self.verify,
            )
        except requests.RequestException as exc:
            return ApiResult(ApiStatus.RETRYABLE, None, None, _exc_text(exc))
        read_timeout = (timeout or (self.connect_timeout, self.read_timeout))[1]
        try:
            return self._result(response, time.monotonic() + read_timeout)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            # The answer broke off mid-body: whether it was applied is unknown.
            return ApiResult(ApiStatus.RETRYABLE, response.status_code, None, _exc_text(exc))
        finally:
            response.close()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _result(self, response: requests.Response, deadline: float) -> ApiResult:
        code = response.status_code
        body, error = self._read_body(response, deadline)
        if 300 <= code < 400:
            error = error or f"redirect to {response.headers.get('Location')!r} not followed"
        return ApiResult(_classify(code), code, body, error)

    def _read_body(self, response: requests.Response,
                   deadline: float) -> tuple[Any, str]:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            return None, f"response body of {declared} bytes refused (max {self.max_body})"
        chunks: list[bytes] = []
        size = 0
        # read1: one socket read at a time, so a server trickling its answer byte by
        # byte (each read within the read timeout) still cannot hold us past `deadline`.
        while chunk := response.raw.read1(65536, decode_content=True):
            size += len(chunk)
            if size > self.max_body:
                return None, f"response body over {self.max_body} bytes refused"
            if time.monotonic() > deadline:
                raise requests.Timeout("response body still arriving at the deadline")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw:
            return None, ""
        try:
            return json.loads(raw), ""
        except ValueError:
            return raw.decode("utf-8", errors="replace")[:1000], "response is not JSON"
        except RecursionError:
            return None, "response JSON is nested too deeply"


def state_payload(
    state: str,
    *,
    progress: int | None = None,
    duration_ms: int | None = None,
    result: dict[str, Any] | None = None,
    task_name: str | None = None,
    estimated_time: int | None = None,
    crucial_pass: bool | None = None,
) -> dict[str, Any]:
    """The JSON body of a state update; fields left as None are omitted."""
    payload: dict[str, Any] = {"state": str(state).upper()}
    optional = {
        "progress": as_int(progress),
        "durationMs": as_int(duration_ms),
        "result": result,
        "taskName": task_name,
        "estimatedTime": as_int(estimated_time),
        "crucialPass": crucial_pass,
    }
    payload.update({key: value for key, value in optional.items() if value is not None})
    return payload


def as_int(value: Any) -> int | None:
    """Numbers on the wire are ints; NaN, infinities and junk are left out."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) else None


def _classify(code: int) -> ApiStatus:
    if 200 <= code < 300:
        return ApiStatus.OK
    if code == 404:
        return ApiStatus.NOT_FOUND
    if code >= 500 or code in (408, 429):
        return ApiStatus.RETRYABLE
    return ApiStatus.CLIENT_ERROR


def _run_id_of(result: ApiResult) -> str | None:
    if not result.ok:
        raise ApiError(result)
    body = result.body if isinstance(result.body, dict) else {}
    run_id = body.get("runId")
    return run_id if isinstance(run_id, str) and run_id else None


def _seg(value: str) -> str:
    """One URL path segment: ids are quoted so a '/' or '?' cannot change the route."""
    return quote(str(value), safe="")


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
