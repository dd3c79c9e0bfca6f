"""Where a task start's time goes: a diagnostic, not part of `run_all`.

    python bench/profile_start.py [--calls N] [--top K]

Three views of one no-op task call:

1. Control process: cProfile of `FlowRun.execute` over N calls (default
   start method). Time inside epoll/lock waits is time spent waiting for the
   fork server or the task process.
2. Task process: a harness set up the way `forkserver.main` sets up the fork
   server (imports `perfect_runner.isolation.forkserver`, loads the flows
   module, `child_bootstrap.preload_roles()` and `gc.freeze()` when the
   runner has them) forks, and the child runs the real
   `child_bootstrap.become_child` under cProfile, answering one RunTask frame
   built by hand (so the harness itself imports nothing more). Phases are
   timed from the harness: fork, fork -> reply, reply -> reaped.
3. The same harness without the preload, i.e. every child imports the
   child-side code itself (what the runner did before it preloaded).
4. CPU per call, by process, over N real calls: the control process
   (os.times), the fork server itself, and its reaped children (task
   processes and the run's flow process), from /proc/<server>/stat. On a
   machine with no idle core the call costs about the sum, not the path.
5. A task process's CPU, phase by phase (time.process_time() marks around the
   bootstrap and run_task steps, in the harness of view 2): which tenths of a
   millisecond a spare spends before its RunTask, and which after.
6. What each step adds to a forked child, by difference: children that fork
   from the harness of view 2 and do only steps 1..k, then `os._exit`; their
   page faults and CPU (RUSAGE_CHILDREN) minus those of a child that does
   nothing. On a VM a copy-on-write fault costs microseconds, and each page a
   child writes that it shares with the fork server is one: this is where a
   task process's CPU goes, and what a step must avoid touching.
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import io
import json
import os
import pickle
import pstats
import socket
import statistics
import struct
import sys
import tempfile
import time

PREFIX = struct.Struct(">II")


def control_side(module: str, calls: int, top: int) -> None:
    import common

    runner = common.NoopFlows(module, calls)
    try:
        runner.batch()
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        samples = runner.batch()
        profile.disable()
        wall = time.perf_counter() - start
    finally:
        runner.close()
    print(f"== 1. control process: {calls} calls, {wall * 1000 / calls:.2f} ms per call "
          f"(flow body median {statistics.median(samples) * 1000:.2f} ms) ==")
    _print_stats(pstats.Stats(profile), top, calls)


def cpu_by_process(module: str, calls: int) -> None:
    import common

    # Without the sandbox: there the fork server reaps the task processes itself, so
    # its /proc stat counts their CPU (in the sandbox, init's stub would hide it).
    runner = common.NoopFlows(module, calls, sandbox="off")
    try:
        runner.batch()
        server = runner.executor.launcher.server_pid
        before, own = _server_usage(server), os.times()
        start = time.perf_counter()
        samples = runner.batch()
        wall = time.perf_counter() - start
        after, own_after = _server_usage(server), os.times()
    finally:
        runner.close()
    per = 1000 / calls
    control = (own_after.user - own.user + own_after.system - own.system) * per
    server_own, children = ((after[i] - before[i]) * per for i in range(2))
    faults, child_faults = ((after[i] - before[i]) / calls for i in range(2, 4))
    print(f"== 4. CPU per call by process, --sandbox off ({calls} calls; wall {wall * per:.2f} "
          f"ms per call, flow body median {statistics.median(samples) * 1000:.2f} ms) ==")
    print(f"control process {control:.2f} ms | fork server {server_own:.2f} ms "
          f"({faults:.0f} page faults) | task + flow processes {children:.2f} ms "
          f"({child_faults:.0f} page faults) | sum {control + server_own + children:.2f} ms\n")


def _server_usage(pid: int) -> tuple[float, float, int, int]:
    """The fork server's own CPU seconds, its reaped children's, and both page fault counts."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(x) / tick for x in fields[11:15])
    return utime + stime, cutime + cstime, int(fields[7]), int(fields[8])


PHASES = {"child_bootstrap": ["_reset_signals", "die_with_parent", "become_subreaper",
                              "_wire_fds", "_flush_std"],
          "task_child": ["recv_message_fds", "apply_setup", "_execute", "final_frame",
                         "send_payload"]}


def phase_marks(key: str, calls: int) -> None:
    """View 5: process_time() marks around each step, written by each child at exit."""
    import importlib

    marks: list[tuple[str, float]] = []
    for module_name, names in PHASES.items():
        module = importlib.import_module(f"perfect_runner.isolation.{module_name}")
        for name in names:
            if hasattr(module, name):  # steps come and go with the bootstrap's code
                setattr(module, name, _marked(getattr(module, name), name, marks))
    real_exit = os._exit
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "marks")

        def exit_with_marks(code: int) -> None:
            marks.append(("exit", time.process_time()))
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, (json.dumps(marks) + "\n").encode())
            real_exit(code)

        os._exit = exit_with_marks
        try:
            for _ in range(calls):
                _one_child(key, None)
        finally:
            os._exit = real_exit
        with open(path) as handle:
            runs = [json.loads(line) for line in handle]
    steps: dict[str, list[float]] = {}
    for run in runs:
        previous = 0.0
        for name, at in run:
            steps.setdefault(name, []).append(at - previous)
            previous = at
    print(f"== 5. task process CPU by phase ({len(runs)} children; median ms of CPU since "
          f"the previous mark; '>' entering a step, '<' leaving it) ==")
    for name, spent in steps.items():
        print(f"{statistics.median(spent) * 1000:8.3f}  {name}")
    total = statistics.median(run[-1][1] for run in runs)
    print(f"{total * 1000:8.3f}  total, fork to exit\n")


def step_costs(children: int) -> None:
    """View 6: faults and CPU each bootstrap step adds to a forked child, by difference."""
    from perfect_runner.isolation import child_bootstrap as boot
    from perfect_runner.isolation import oskit, task_child

    out = os.open(os.devnull, os.O_WRONLY)
    chan, end = socket.socketpair()  # made here: a child gets its channel made for it

    def wire() -> None:
        boot._wire_fds(out, out, end.fileno())

    steps = [("reset signals", boot._reset_signals), ("setsid", os.setsid),
             ("die with parent, subreaper",
              lambda: (oskit.die_with_parent(os.getppid()), oskit.become_subreaper())),
             ("wire fds", wire),
             ("rehearse the call", lambda: task_child.rehearse(chan))]
    print(f"== 6. what each step adds to a forked child ({children} children per row; "
          f"cumulative: each row does the steps above it too) ==")
    base = _children_usage(lambda: None, children)
    print(f"{'faults':>7}  {'cpu ms':>7}  {'+faults':>7}  {'+cpu ms':>7}  step")
    print(f"{base[0]:7.0f}  {base[1]:7.3f}  {'':>7}  {'':>7}  fork + exit, nothing else")
    previous, done = base, []
    for name, step in steps:
        done.append(step)
        now = _children_usage(lambda: [do() for do in done], children)
        print(f"{now[0]:7.0f}  {now[1]:7.3f}  {now[0] - previous[0]:+7.0f}  "
              f"{now[1] - previous[1]:+7.3f}  {name}")
        previous = now
    chan.close()
    end.close()
    print()


def _children_usage(work, children: int) -> tuple[float, float]:
    """Mean page faults and CPU ms of `children` forked children that run `work`."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            try:
                work()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return (after.ru_minflt - before.ru_minflt) / children, cpu * 1000 / children


def _marked(func, name: str, marks: list):
    def wrapper(*args, **kwargs):
        marks.append((name + ">", time.process_time()))
        try:
            return func(*args, **kwargs)
        finally:
            marks.append((name + "<", time.process_time()))
    return wrapper


def _frame(header: dict, blob: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return PREFIX.pack(len(raw), len(blob)) + raw + blob


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("channel closed")
        data += chunk
    return data


def _one_child(key: str, profile_path: str | None) -> tuple[float, float, float]:
    from perfect_runner.isolation.child_bootstrap import ChildConfig, become_child

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    chan, chan_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    config = ChildConfig(role="task", parent_pid=os.getpid())
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        chan.close()
        profile = cProfile.Profile() if profile_path else None
        if profile:
            real_exit = os._exit

            def exit_after_dump(code: int) -> None:
                profile.disable()
                profile.dump_stats(profile_path)
                real_exit(code)

            os._exit = exit_after_dump
            profile.enable()
        become_child(config, out_w, err_w, chan_child.fileno())
    forked = time.perf_counter()
    for fd in (out_w, err_w):
        os.close(fd)
    chan_child.close()
    request = {"type": "run_task", "key": key, "name": "noop", "index": 0, "attempt": 1,
               "max_result": 64 << 20}
    # The arguments go on the payload channel sent with the RunTask (see payload.py).
    payload, payload_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    args = pickle.dumps(((), {}), protocol=pickle.HIGHEST_PROTOCOL)
    payload.sendall(struct.pack(">Q", len(args)) + args)
    socket.send_fds(chan, [_frame(request)], [payload_child.fileno()])
    payload_child.close()
    (result_len,) = struct.unpack(">Q", _recv_exact(payload, 8))
    _recv_exact(payload, result_len)
    header_len, blob_len = PREFIX.unpack(_recv_exact(chan, PREFIX.size))
    reply = json.loads(_recv_exact(chan, header_len))
    _recv_exact(chan, blob_len)
    replied = time.perf_counter()
    payload.close()
    os.waitpid(pid, 0)
    reaped = time.perf_counter()
    chan.close()
    for fd in (out_r, err_r):
        os.close(fd)
    if reply.get("type") != "task_returned":
        raise RuntimeError(f"unexpected reply {reply}")
    return forked - start, replied - forked, reaped - replied


def child_side(module: str, calls: int, top: int, preload: bool) -> None:
    """Runs in a fresh interpreter set up like the fork server."""
    import gc

    import perfect_runner.isolation.forkserver  # noqa: F401 - what the fork server imports
    from perfect_runner.isolation import child_bootstrap
    from perfect_runner.isolation.loader import load_modules

    load_modules([module])
    if preload and hasattr(child_bootstrap, "preload_roles"):
        child_bootstrap.preload_roles()
    if preload and hasattr(child_bootstrap, "prepare_streams"):
        child_bootstrap.prepare_streams()
    if preload:
        gc.freeze()
    key = f"{os.path.splitext(os.path.basename(module))[0]}:noop"
    for _ in range(5):
        _one_child(key, None)  # warm-up
    phases = [_one_child(key, None) for _ in range(calls)]
    with tempfile.TemporaryDirectory() as directory:
        for i in range(min(calls, 50)):
            _one_child(key, os.path.join(directory, f"child-{i}.prof"))
        files = sorted(glob.glob(os.path.join(directory, "*.prof")))
        stats = pstats.Stats(files[0])
        for path in files[1:]:
            stats.add(path)
    what = "parent set up like the fork server" if preload else "no preload of the child code"
    fork, run, reap = (statistics.median(p[i] for p in phases) * 1000 for i in range(3))
    print(f"== {2 if preload else 3}. task process, {what}: {calls} children; median "
          f"fork {fork:.2f} ms, fork->reply {run:.2f} ms, reply->reaped {reap:.2f} ms, "
          f"total {fork + run + reap:.2f} ms ==")
    print(f"(child-side cProfile below: {len(files)} children, per-child times)")
    _print_stats(stats, top, len(files))
    if preload:
        step_costs(min(calls, 300))
        phase_marks(key, min(calls, 100))  # last: it patches the child-side modules


def _print_stats(stats: pstats.Stats, top: int, per: int) -> None:
    stream = io.StringIO()
    stats.stream = stream
    stats.sort_stats("cumulative").print_stats(top)
    lines = stream.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    print(f"{'cum ms/call':>11}  {'own ms/call':>11}  function")
    for line in lines[start + 1:]:
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        own, cum = float(parts[1]), float(parts[3])
        print(f"{cum * 1000 / per:11.3f}  {own * 1000 / per:11.3f}  {parts[5]}")
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--child-side", choices=["preload", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--module", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_side:
        child_side(args.module, args.calls, args.top, args.child_side == "preload")
        return
    # Imported here: the child-side harness must not import the runner's modules.
    import common

    module = common.noop_flows_module(common.work_dir("profile"))
    control_side(module, args.calls, args.top)
    cpu_by_process(module, args.calls)
    sys.stdout.flush()
    for mode in ("preload", "plain"):
        # A fresh interpreter: this one has imported the whole runner.
        os.spawnv(os.P_WAIT, sys.executable, [
            sys.executable, "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import profile_start; "
            "profile_start.main(sys.argv[2:])",
            str(common.BENCH_DIR), "--child-side", mode, "--module", module,
            "--calls", str(args.calls), "--top", str(args.top)])


if __name__ == "__main__":
    main()
