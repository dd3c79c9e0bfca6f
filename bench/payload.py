"""Issue 13 part 2: payloads go straight between the flow and the task process.

The flow body passes a 100 MB bytes argument to a task that returns it (so
100 MB go each way) and times the call. The bench process plays the control
process; its peak RSS (VmHWM) after all rounds, minus its RSS before the
first, is what the payloads cost it.

Side by side, round by round: a bare pipe copy of the same bytes between two
processes (`--pipe-copy`, in a fresh interpreter so its 200 MB do not count
as ours): one process writes 100 MB into a pipe (default size), the other
reads them into a buffer with readv and writes that buffer back, read into a
buffer again; 1 MiB writes, no pickling, no copies but the pipe's. For
orientation (no target), the same with both pipes enlarged to 1 MiB.

Targets: control RSS growth <= 10 MiB; median call <= 1.5x the median pipe copy.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common
from common import NoopFlows, Row, Stats, interleave, mib, print_table

from perfect_runner.executor.engine import FlowExecutor
from perfect_runner.executor.options import RunOptions

SIZE = 100 * 1000 * 1000
CHUNK = 1 << 20
F_SETPIPE_SZ = 1031

FLOWS = '''
import json
import os
import time

from perfect_runner import flow, task


@task
def echo(data):
    return data


@flow()
def payload_round_trip():
    size = int(os.environ["PR_BENCH_PAYLOAD"])
    data = b"x" * size
    start = time.perf_counter()
    back = echo(data)
    elapsed = time.perf_counter() - start
    assert len(back) == size
    with open(os.environ["PR_BENCH_OUT"], "w") as out:
        json.dump([elapsed], out)
'''


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _read_into(fd: int, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        count = os.readv(fd, [view[got:]])
        if not count:
            raise EOFError(f"pipe closed after {got} of {size} bytes")
        got += count
    return buffer


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:CHUNK]):]


def pipe_copy(size: int, pipe_size: int = 0) -> float:
    """Seconds to send `size` bytes to another process over a pipe and get them back
    (`pipe_size`: enlarge both pipes to that many bytes; 0: the default 64 KiB)."""
    there_r, there_w = os.pipe()
    back_r, back_w = os.pipe()
    for fd in (there_w, back_w) if pipe_size else ():
        fcntl.fcntl(fd, F_SETPIPE_SZ, pipe_size)
    data = b"x" * size
    pid = os.fork()
    if pid == 0:
        os.close(there_w)
        os.close(back_r)
        _write_all(back_w, _read_into(there_r, size))
        os._exit(0)
    os.close(there_r)
    os.close(back_w)
    start = time.perf_counter()
    _write_all(there_w, data)
    back = _read_into(back_r, size)
    elapsed = time.perf_counter() - start
    os.waitpid(pid, 0)
    assert len(back) == size
    return elapsed


def pipe_batch(size: int, pipe_size: int = 0) -> list[float]:
    proc = subprocess.run([sys.executable, __file__, "--pipe-copy", str(size), str(pipe_size)],
                          capture_output=True, text=True, check=True, cwd=common.REPO)
    return json.loads(proc.stdout)


class RoundTrips(NoopFlows):
    def __init__(self, module: str, size: int) -> None:
        self.out = f"{module}.out.json"
        self.flow = "payload_round_trip"
        env = common.bench_env(PR_BENCH_PAYLOAD=str(size), PR_BENCH_OUT=self.out)
        options = RunOptions(max_result=size + (16 << 20))
        self.executor = FlowExecutor([module], "forkserver", options, env=env)


def main(quick: bool = False) -> list[Row]:
    rounds = 5 if quick else 9  # the VM is shared: single samples swing 3x
    directory = common.work_dir("payload")
    module = common.write_module(directory, "payload_flows", FLOWS)
    print(f"issue 13.2: {SIZE // 10**6} MB each way ({rounds} rounds)", file=sys.stderr)
    small = RoundTrips(module, 1000)
    try:
        small.batch()  # warm-up: the control process's first run costs what it costs
    finally:
        small.close()
    runner = RoundTrips(module, SIZE)
    try:
        rss_before = common.rss_bytes()
        pooled = interleave({"call": runner.batch, "pipe": lambda: pipe_batch(SIZE),
                             "pipe_1mib": lambda: pipe_batch(SIZE, 1 << 20)}, rounds)
        growth = peak_rss() - rss_before
    finally:
        runner.close()
    call, pipe = Stats.of(pooled["call"]).median, Stats.of(pooled["pipe"]).median
    ratio = call / pipe
    print_table(f"13.2 Payloads: {SIZE // 10**6} MB argument + {SIZE // 10**6} MB result "
                f"({rounds} rounds)", ["variant", "n", "median ms", "min ms", "max ms"],
                [["task call, flow -> task -> flow", *_ms(pooled["call"])],
                 ["bare pipe copy, there and back", *_ms(pooled["pipe"])],
                 ["the same, pipes enlarged to 1 MiB", *_ms(pooled["pipe_1mib"])]])
    print(f"control process: RSS {mib(rss_before):.1f} MiB before, peak growth "
          f"{mib(growth):.1f} MiB", flush=True)
    big_pipe = Stats.of(pooled["pipe_1mib"]).median
    return [
        Row("13.2 payload", "100 MB each way: control peak RSS growth", "<= 10 MiB",
            f"{mib(growth):.1f} MiB", growth <= 10 << 20),
        Row("13.2 payload", "100 MB each way: call / bare pipe copy", "<= 1.5x",
            f"{ratio:.2f}x ({call * 1000:.0f} vs {pipe * 1000:.0f} ms)", ratio <= 1.5),
        Row("13.2 payload", "100 MB each way: call / pipe copy, 1 MiB pipes", "-",
            f"{call / big_pipe:.2f}x ({big_pipe * 1000:.0f} ms)", None),
    ]


def _ms(samples: list[float]) -> list[float]:
    s = Stats.of(samples)
    return [s.n, s.median * 1000, s.min * 1000, s.max * 1000]


if __name__ == "__main__":
    if "--pipe-copy" in sys.argv:
        at = sys.argv.index("--pipe-copy")
        print(json.dumps([pipe_copy(int(sys.argv[at + 1]), int(sys.argv[at + 2]))]))
    else:
        common.print_rows(main("--quick" in sys.argv))
