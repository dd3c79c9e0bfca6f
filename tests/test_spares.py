"""Spares: task processes started ahead of the calls, as many as demand calls for
within a bound, dying with their run; each learns its task's settings in its first
frame, so no spare runs a task with settings that are not that task's."""

from __future__ import annotations

import json
import resource
from pathlib import Path

from conftest import is_gone_in

from perfect_runner.executor import spare
from perfect_runner.executor.options import RunOptions
from perfect_runner.executor.spare import MAX_SPARES

# A task sees the other task processes waiting beside it: the fork server's other
# children, minus the flow process (whose pid the flow body passes in).
SIBLINGS = """
import json
import select


def waiting_siblings(flow_pid):
    server = os.getppid()
    found = []
    for tid in os.listdir(f"/proc/{server}/task"):
        with open(f"/proc/{server}/task/{tid}/children") as handle:
            found += [int(p) for p in handle.read().split()]
    alive = []
    for pid in found:
        if pid in (os.getpid(), flow_pid):
            continue
        try:
            with open(f"/proc/{pid}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


@task
def look(flow_pid):
    # Younger than this task: the spares started since it was taken (FIFO). Older
    # ones are earlier task processes still exiting. Pids are handed out in order
    # (the test is far from a wrap of pid_max).
    return [pid for pid in waiting_siblings(flow_pid) if pid > os.getpid()]


@task
def kill_siblings(flow_pid):
    # The next spare was requested as this task started: wait until it is forked.
    end = time.monotonic() + 10
    while not (killed := waiting_siblings(flow_pid)) and time.monotonic() < end:
        time.sleep(0.005)
    pidfds = [os.pidfd_open(pid) for pid in killed]
    for pidfd in pidfds:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    for pidfd in pidfds:  # dead when the next call comes (SIGKILL takes a moment)
        select.select([pidfd], [], [], 10)
    return killed


@task
def double(x):
    return 2 * x


@flow("many_calls")
def many_calls():
    seen = [look(os.getpid()) for _ in range(60)]
    (TMP / "seen.json").write_text(json.dumps(seen))
    (TMP / "namespace").write_text(os.readlink("/proc/self/ns/pid"))


@flow("killer")
def killer():
    killed = kill_siblings(os.getpid())
    results = [double(i) for i in range(5)]
    (TMP / "killer.json").write_text(json.dumps({"killed": killed, "results": results}))
"""


def test_spares_stay_within_the_bound_and_die_with_their_run(write_flows, run_flow,
                                                             tmp_path: Path) -> None:
    ran = run_flow(write_flows(SIBLINGS), "many_calls")
    assert ran.record.state == "COMPLETED"
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert max(len(pids) for pids in seen) <= MAX_SPARES, seen
    assert any(seen), "no call ever found a spare waiting"
    every = {pid for pids in seen for pid in pids}
    namespace = (tmp_path / "namespace").read_text()  # the pids are the sandbox's own
    assert all(is_gone_in(namespace, pid) for pid in every)  # run_flow checks the rest
    assert spare.EXTRA.free == spare.EXTRA_BUDGET  # the run gave back what it took


def test_with_no_shared_budget_a_run_keeps_one_spare(write_flows, run_flow, tmp_path: Path,
                                                     monkeypatch) -> None:
    monkeypatch.setattr(spare, "EXTRA", spare._Budget(0))
    ran = run_flow(write_flows(SIBLINGS), "many_calls")
    assert ran.record.state == "COMPLETED"
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert max(len(pids) for pids in seen) <= 1, seen


def test_a_task_that_kills_the_waiting_spares_does_not_break_the_next_calls(
        write_flows, run_flow, tmp_path: Path) -> None:
    ran = run_flow(write_flows(SIBLINGS), "killer")
    assert ran.record.state == "COMPLETED", [(t.name, t.note) for t in ran.record.tasks]
    out = json.loads((tmp_path / "killer.json").read_text())
    assert out["killed"], "no spare was waiting to be killed"
    assert out["results"] == [0, 2, 4, 6, 8]
    assert [t.state for t in ran.record.tasks] == ["COMPLETED"] * 6


SETTINGS = """
import resource


@task(memory_limit="300MB")
def capped():
    return resource.getrlimit(resource.RLIMIT_AS)[0], os.getcwd(), os.environ.get("PR_MARK")


@task
def free():
    return resource.getrlimit(resource.RLIMIT_AS)[0], os.getcwd(), os.environ.get("PR_MARK")


@flow("alternate")
def alternate():
    seen = [(capped() if i % 2 else free()) for i in range(8)]
    (TMP / "settings.json").write_text(json.dumps(seen))
"""


def test_each_task_runs_with_its_own_limits_whatever_spare_it_got(write_flows, run_flow,
                                                                  tmp_path: Path) -> None:
    options = RunOptions(hard_memory_cap=True, task_workdir="tmp",
                         child_env={"PR_MARK": "this-run", "PATH": "/usr/bin:/bin"})
    ran = run_flow(write_flows("import json\n" + SETTINGS), "alternate", options=options)
    assert ran.record.state == "COMPLETED", ran.record.note
    seen = json.loads((tmp_path / "settings.json").read_text())
    unlimited = resource.RLIM_INFINITY
    assert [limit for limit, _, _ in seen] == [unlimited, 300_000_000] * 4
    assert len({cwd for _, cwd, _ in seen}) == 8  # a fresh workdir per call
    assert {mark for _, _, mark in seen} == {"this-run"}


CRASH = """
@task
def noop():
    return None


@task
def crash():
    os.kill(os.getpid(), signal.SIGKILL)


@flow("crashes")
def crashes():
    for _ in range(30):
        noop()
    crash()
"""


def test_a_failed_run_gives_back_its_spares(write_flows, run_flow) -> None:
    ran = run_flow(write_flows(CRASH), "crashes")
    assert ran.record.state == "FAILED"
    assert ran.record.tasks[-1].note == "crashed: SIGKILL (killed)"
    assert spare.EXTRA.free == spare.EXTRA_BUDGET
