"""Configuration: PERFECT_* environment values and options, parsed strictly.

Yes/no variables take 1/0, true/false, yes/no, on/off (any case); anything else,
and any number or choice that does not parse, is a one-line usage error (exit 2)
naming the variable. Exit codes and messages go through the real CLI; TLS
verification is checked against a real HTTPS server on 127.0.0.1.
"""

from __future__ import annotations

import ast
import http.server
import os
import ssl
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO
from worker_process import stop_worker

from perfect_runner.config import UsageError, parse_args

BOOLEANS = {"INSECURE": "insecure", "HARD_MEMORY_CAP": "hard_memory_cap",
            "KEEP_WORKDIRS": "keep_workdirs", "FULL_TRACEBACKS": "full_tracebacks"}
TRUE = ["1", "true", "TRUE", "True", "yes", "Yes", "on", "ON"]
FALSE = ["0", "false", "False", "FALSE", "no", "NO", "off", "Off", ""]
FLOWS = "import perfect_runner\n\n@perfect_runner.flow('F')\ndef f():\n    pass\n"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in [k for k in os.environ if k.startswith("PERFECT_")]:
        monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize("variable", list(BOOLEANS))
@pytest.mark.parametrize("value", TRUE + FALSE)
def test_yes_no_variables_take_the_usual_spellings(clean_env, variable: str, value: str):
    clean_env.setenv(f"PERFECT_{variable}", value)
    args = parse_args(["--flows", "f.py", "--list"])
    assert getattr(args, BOOLEANS[variable]) is (value in TRUE)


def test_yes_no_variables_default_to_no(clean_env) -> None:
    args = parse_args(["--flows", "f.py", "--list"])
    assert not any(getattr(args, attribute) for attribute in BOOLEANS.values())


@pytest.mark.parametrize("value", ["maybe", "2", "-1", "y", "enabled", "nope"])
def test_other_yes_no_values_are_refused(clean_env, value: str) -> None:
    clean_env.setenv("PERFECT_KEEP_WORKDIRS", value)
    with pytest.raises(UsageError, match=r"^PERFECT_KEEP_WORKDIRS=.* is not a yes/no value"):
        parse_args(["--flows", "f.py", "--list"])


def test_numbers_sizes_and_choices_from_the_environment(clean_env) -> None:
    for key, value in {"CONCURRENCY": "3", "TASK_TIMEOUT": "2.5", "MAX_PROCS": "40",
                       "MAX_LOG_FILE_SIZE": "1MiB", "LOG_LEVEL": "DEBUG",
                       "TASK_WORKDIR": "tmp", "START_METHOD": "spawn"}.items():
        clean_env.setenv(f"PERFECT_{key}", value)
    args = parse_args(["--flows", "f.py", "--list"])
    assert (args.concurrency, args.task_timeout, args.max_procs) == (3, 2.5, 40)
    assert args.max_log_bytes == 1024 * 1024
    assert (args.log_level, args.task_workdir, args.start_method) == ("DEBUG", "tmp", "spawn")


def test_the_command_line_wins_and_the_log_bound_has_a_default(clean_env) -> None:
    clean_env.setenv("PERFECT_MAX_LOG_FILE_SIZE", "1MiB")
    assert parse_args(["--flows", "f.py", "--list",
                       "--max-log-file-size", "20KB"]).max_log_bytes == 20_000
    clean_env.delenv("PERFECT_MAX_LOG_FILE_SIZE")
    assert parse_args(["--flows", "f.py", "--list"]).max_log_bytes == 100 * 1024 * 1024


# --- through the real CLI ---------------------------------------------------------


def cli(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    flows = tmp_path / "cfg_flows.py"
    flows.write_text(FLOWS)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PERFECT_")}
    return subprocess.run(
        [sys.executable, "-m", "perfect_runner", "--flows", str(flows), "--list", *args],
        cwd=tmp_path, env={**base, "PYTHONPATH": str(REPO), **env}, capture_output=True,
        text=True, stdin=subprocess.DEVNULL, timeout=30)


BAD = [
    ({"PERFECT_INSECURE": "maybe"}, (),
     "PERFECT_INSECURE='maybe' is not a yes/no value: use 1/0, true/false, yes/no or on/off"),
    ({"PERFECT_HARD_MEMORY_CAP": "enabled"}, (), "PERFECT_HARD_MEMORY_CAP='enabled' is not "
     "a yes/no value"),
    ({"PERFECT_KEEP_WORKDIRS": "2"}, (), "PERFECT_KEEP_WORKDIRS='2' is not a yes/no value"),
    ({"PERFECT_FULL_TRACEBACKS": "full"}, (),
     "PERFECT_FULL_TRACEBACKS='full' is not a yes/no value"),
    ({"PERFECT_CONCURRENCY": "two"}, (), "PERFECT_CONCURRENCY='two' is not a whole number"),
    ({"PERFECT_TASK_TIMEOUT": "soon"}, (), "PERFECT_TASK_TIMEOUT='soon' is not a number"),
    ({"PERFECT_LOG_LEVEL": "verbose"}, (),
     "PERFECT_LOG_LEVEL='verbose': use one of DEBUG, INFO, WARNING, ERROR"),
    ({"PERFECT_TASK_WORKDIR": "home"}, (), "PERFECT_TASK_WORKDIR='home': use one of inherit, tmp"),
    ({"PERFECT_START_METHOD": "fork"}, (), "PERFECT_START_METHOD='fork': use one of "
     "forkserver, spawn"),
    ({"PERFECT_MAX_LOG_FILE_SIZE": "big"}, (), "--max-log-file-size: memory size 'big' is "
     "not a size"),
    ({}, ("--max-log-file-size", "1KB"), "--max-log-file-size must be at least 16KiB"),
]


@pytest.mark.parametrize(("env", "args", "message"), BAD,
                         ids=[next(iter(e), a[0] if a else "") for e, a, _ in BAD])
def test_bad_values_are_one_line_usage_errors(tmp_path: Path, env, args, message) -> None:
    done = cli(tmp_path, env, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"perfect-runner: error: {message}"), done.stderr
    assert done.stdout == ""


def test_good_values_run(tmp_path: Path) -> None:
    done = cli(tmp_path, {"PERFECT_INSECURE": "Off", "PERFECT_KEEP_WORKDIRS": "yes",
                          "PERFECT_MAX_LOG_FILE_SIZE": "64KiB", "PERFECT_CONCURRENCY": "2"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["F"]


# --- PERFECT_INSECURE against a real HTTPS server ----------------------------------


class _Recording(http.server.BaseHTTPRequestHandler):
    seen: list[str]

    def _answer(self) -> None:
        self.seen.append(f"{self.command} {self.path}")
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTPS server with a self-signed certificate; yields (url, requests seen)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    seen: list[str] = []
    handler = type("Handler", (_Recording,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.handle_error = lambda *a: None  # refused handshakes are the point
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def serve_briefly(tmp_path: Path, url: str, insecure: str, until) -> str:
    """A worker with PERFECT_INSECURE=`insecure` until `until(output)`; its output."""
    flows = tmp_path / "cfg_flows.py"
    flows.write_text(FLOWS)
    out_path = tmp_path / f"worker-{insecure}.out"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PERFECT_")}
    with open(out_path, "w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "perfect_runner", "--flows", str(flows), "--server", url,
             "--log-dir", str(tmp_path / "logs")], cwd=tmp_path, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**base, "PYTHONPATH": str(REPO), "PERFECT_INSECURE": insecure})
    try:
        for _ in range(300):
            if until(out_path.read_text()) or worker.poll() is not None:
                break
            threading.Event().wait(0.05)  # polling a file the worker writes
    finally:
        stop_worker(worker)
    return out_path.read_text()


def test_insecure_false_keeps_tls_verification_on(tmp_path: Path, https_server) -> None:
    url, seen = https_server
    out = serve_briefly(tmp_path, url, "false",
                        lambda text: "CERTIFICATE_VERIFY_FAILED" in text)
    assert "CERTIFICATE_VERIFY_FAILED" in out, out
    assert "verification is OFF" not in out
    assert seen == []  # no request got through the refused handshake


def test_insecure_true_turns_it_off_with_a_warning(tmp_path: Path, https_server) -> None:
    url, seen = https_server
    out = serve_briefly(tmp_path, url, "TRUE", lambda text: bool(seen))
    assert "TLS certificate verification is OFF (--insecure)" in out, out
    assert "POST /api/heartbeat" in seen


# --- declared dependencies ---------------------------------------------------------


def test_every_imported_package_is_declared() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {dep.split(">")[0].split("=")[0].split("<")[0].strip().lower()
                for dep in project["dependencies"]}
    assert "urllib3>=2" in project["dependencies"]  # read1() is urllib3 2.x only
    imported = set()
    for path in (REPO / "perfect_runner").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported - set(sys.stdlib_module_names) if m != "perfect_runner"}
    assert third_party <= declared, f"imported but not declared: {third_party - declared}"
