"""Shared helpers for the benchmarks: statistics, interleaving, tables, flows modules.

Every benchmark script in this directory has a `main(quick: bool) -> list[Row]`
that prints its own tables and returns the rows `run_all.py` summarises
(target vs measured vs pass/miss).

The bench process plays the control process: it drives `FlowExecutor` directly,
with a listener that does nothing (`QuietListener`) unless the listener is what
is measured.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from perfect_runner.executor.engine import FlowExecutor  # noqa: E402
from perfect_runner.executor.events import NullListener  # noqa: E402
from perfect_runner.executor.records import RunRecord  # noqa: E402

MS = 1000.0

# Installed packages come with bytecode caches; a sandbox that sets
# PYTHONDONTWRITEBYTECODE makes every task process compile from source the
# modules it imports, which is not what a worker sees. So the bench keeps
# bytecode caches (outside the repo) unless PR_BENCH_KEEP_ENV=1.
PYCACHE_NOTE = ""
if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PR_BENCH_KEEP_ENV"):
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ.setdefault("PYTHONPYCACHEPREFIX",
                          os.path.join(tempfile.gettempdir(), "pr-bench-pycache"))
    PYCACHE_NOTE = (f"note: PYTHONDONTWRITEBYTECODE was set; children get bytecode caches "
                    f"under PYTHONPYCACHEPREFIX={os.environ['PYTHONPYCACHEPREFIX']} "
                    f"(PR_BENCH_KEEP_ENV=1 keeps the environment as is)")


# --- result rows -----------------------------------------------------------


@dataclass
class Row:
    """One line of the final summary: a target and what was measured."""

    item: str
    metric: str
    target: str
    measured: str
    passed: bool | None  # None: informational, no target
    skipped: bool = False  # not measured here (a baseline's tool is missing): not a miss

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def verdict(self) -> str:
        if self.skipped:
            return "skipped"
        return "info" if self.passed is None else ("pass" if self.passed else "MISS")


# --- statistics --------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Stats:
    n: int
    median: float
    p95: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        return cls(len(samples), statistics.median(samples), percentile(samples, 95),
                   min(samples), max(samples))


# --- interleaving -------------------------------------------------------------


def interleave(variants: dict[str, Callable[[], list[float]]], rounds: int,
               progress: bool = True) -> dict[str, list[float]]:
    """Run every variant once per round, in order (A B C A B C ...), pooling samples.

    Each variant callable runs one batch and returns its samples (seconds).
    Garbage is collected before each batch, so one variant's garbage is not
    another's pause.
    """
    pooled: dict[str, list[float]] = {name: [] for name in variants}
    for round_no in range(1, rounds + 1):
        for name, run_batch in variants.items():
            gc.collect()
            pooled[name].extend(run_batch())
        if progress:
            print(f"  round {round_no}/{rounds} done", file=sys.stderr, flush=True)
    return pooled


# --- tables -----------------------------------------------------------------


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                align: str = "", out: Any = None) -> str:
    """Print an aligned plain-text table.

    `align` has one letter per column, "l" or "r"; by default the first column
    is left-aligned and the others right-aligned.
    """
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(row: list[str]) -> str:
        parts = [c.ljust(w) if a == "l" else c.rjust(w)
                 for c, w, a in zip(row, widths, align, strict=True)]
        return "  ".join(parts).rstrip()

    text = "\n".join([title, line(cells[0]), "  ".join("-" * w for w in widths)]
                     + [line(r) for r in cells[1:]])
    print(text, file=out or sys.stdout, flush=True)
    print(file=out or sys.stdout)
    return text


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def timing_rows(pooled: dict[str, list[float]], floor: str | None,
                labels: dict[str, str] | None = None) -> list[list[Any]]:
    """Rows of n / median / p95 / min / max in ms, plus the median's ratio to `floor`."""
    floor_median = Stats.of(pooled[floor]).median if floor else math.nan
    rows = []
    for name, samples in pooled.items():
        s = Stats.of(samples)
        ratio = s.median / floor_median if floor else math.nan
        rows.append([(labels or {}).get(name, name), s.n, s.median * MS, s.p95 * MS,
                     s.min * MS, s.max * MS, f"{ratio:.2f}x" if floor else "-"])
    return rows


TIMING_HEADERS = ["variant", "n", "median ms", "p95 ms", "min ms", "max ms", "x floor"]


# --- flows modules and runs --------------------------------------------------------


class QuietListener(NullListener):
    """Ignores every event, so the listener's cost is not what is measured."""


class RunFailed(RuntimeError):
    pass


def work_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"pr-bench-{prefix}-"))


def write_module(directory: Path, name: str, source: str) -> str:
    """Write a flows module `<directory>/<name>.py`; return its path."""
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source).lstrip())
    return str(path)


def bench_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def execute(executor: FlowExecutor, flow: str, listener: Any = None) -> RunRecord:
    """Run one flow to its end; raise when it did not complete."""
    record = executor.new_run(flow, listener or QuietListener()).execute()
    if record.state != "COMPLETED":
        notes = "; ".join(f"{t.name}: {t.note}" for t in record.tasks if t.state == "FAILED")
        raise RunFailed(f"flow {flow!r} ended {record.state}: {record.note or notes}")
    return record


def read_samples(path: str | Path) -> list[float]:
    with open(path, encoding="utf-8") as f:
        return [float(x) for x in json.load(f)]


def helper(args: Sequence[str], timeout: float = 600) -> Any:
    """Run `python bench/_baselines.py ARGS` in a fresh interpreter; its JSON stdout."""
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "_baselines.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"baseline helper {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the process's own footprint -------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size of this process (VmRSS)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # minus the listdir's own fd


def mib(n: float) -> float:
    """A number for a table column headed "MiB" (text goes through units.format_size)."""
    return n / (1 << 20)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# --- the flows module the task-start benchmarks run ------------------------------

NOOP_FLOWS = '''
"""Flows for perfect_runner's benchmarks: a no-op task timed from the flow body."""
{imports}
import json
import os
import time

from perfect_runner import flow, task

{ballast}

@task
def noop():
    return None


def _timed_calls(pause=0.0):
    timings = []
    for _ in range(int(os.environ["PR_BENCH_CALLS"])):
        time.sleep(pause)  # paced: the spares and the cores are idle when the call comes
        start = time.perf_counter()
        noop()
        timings.append(time.perf_counter() - start)
    return timings


def _report(timings):
    with open(os.environ["PR_BENCH_OUT"], "w") as out:
        json.dump(timings, out)


@flow()
def noop_calls():
    _report(_timed_calls())


@flow()
def noop_calls_paced():
    _report(_timed_calls(0.005))


@flow()
def noop_calls_holding_1gib():
    ballast = bytearray(1 << 30)
    for offset in range(0, len(ballast), 4096):  # touch every page: really resident
        ballast[offset] = 1
    _report(_timed_calls())
    del ballast
'''

HEAVY_IMPORTS = "import asyncio, decimal, email, http.client, json, xml.etree.ElementTree  # noqa"

MODULE_BALLAST = '''
_BALLAST = bytearray(1 << 30)  # held by the fork server: every fork copies its page tables
for _offset in range(0, len(_BALLAST), 4096):
    _BALLAST[_offset] = 1
'''


def noop_flows_module(directory: Path, name: str = "noop_flows", imports: str = "",
                      ballast: bool = False) -> str:
    source = NOOP_FLOWS.format(imports=imports, ballast=MODULE_BALLAST if ballast else "")
    path = directory / f"{name}.py"
    path.write_text(source.lstrip())
    return str(path)


class NoopFlows:
    """A FlowExecutor over a no-op flows module, one run = one batch of timed calls."""

    def __init__(self, module: str, calls: int, start_method: str = "forkserver",
                 flow: str = "noop_calls", sandbox: str = "auto") -> None:
        self.out = f"{module}.{start_method}.{sandbox}.{flow}.json"
        self.flow = flow
        env = bench_env(PR_BENCH_CALLS=str(calls), PR_BENCH_OUT=self.out)
        self.executor = FlowExecutor([module], start_method, env=env, sandbox=sandbox)

    def batch(self) -> list[float]:
        execute(self.executor, self.flow)
        return read_samples(self.out)

    def close(self) -> None:
        self.executor.close()


def print_rows(rows: Sequence[Row], title: str = "Targets", width: int = 44) -> str:
    """The target-vs-measured table; long cells are cut to `width` characters."""
    def cut(text: str) -> str:
        return text if len(text) <= width else text[: width - 1] + "~"

    return print_table(title, ["item", "metric", "target", "measured", "verdict"],
                       [[cut(r.item), cut(r.metric), cut(r.target), cut(r.measured), r.verdict]
                        for r in rows], align="lllll")
