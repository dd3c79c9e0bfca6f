"""Item 11: time from a run's end at the worker to COMPLETED at a slow backend.

    python bench/delivery.py [--quick]

A real worker process serves tests/fake_perfect.py's FakePerfect with the cost model
of a real backend with a UI open: every run write (log entry, state, complete) costs
300 ms plus 20 ms per MB of the stored run, one write at a time. One flow: a task
printing 50,000 lines as fast as it can, then a task that fails (non-crucial), then
a quiet one; the flow body writes `time.time()` to a file as its last statement.
Measured per run: that time -> the moment the fake has answered the run's complete
and the run is COMPLETED (a wait on the fake's condition variable, woken by every
request). "No state lost": every task has its final state and result note, and one
complete arrived. 3 runs (quick: 1).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import common
from common import Row, print_table
from http_cost import WorkerProcess, wait_registered

sys.path.insert(0, str(common.REPO / "tests"))
from fake_perfect import FakePerfect  # noqa: E402

FLOWS = '''
import sys
import time

from perfect_runner import TaskResult, flow, task

END = {end!r}


@task(name="50k lines")
def big():
    write = sys.stdout.write
    for i in range(50_000):
        write(f"line {{i:05d}} of a task printing as fast as it can\\n")
    return TaskResult(passed=True, note="printed")


@task(name="fails", crucial_pass=False)
def fails():
    raise RuntimeError("a non-crucial failure")


@task(name="quiet")
def quiet():
    return TaskResult(passed=True, note="quiet")


@flow(name="delivery")
def delivery():
    big()
    fails()
    quiet()
    with open(END, "w") as out:
        out.write(repr(time.time()))
'''

EXPECTED = [("50k lines", "COMPLETED", "printed"), ("fails", "FAILED", None),
            ("quiet", "COMPLETED", "quiet")]


def _one_run(fake: FakePerfect, end_file: Path) -> tuple[float, bool, str]:
    """(seconds from the flow's end to COMPLETED, nothing lost, run state)."""
    wait_registered(fake, "delivery")
    end_file.unlink(missing_ok=True)
    run_id = fake.trigger("delivery")
    path = f"/api/runs/{run_id}/complete"

    def over() -> bool:
        return (fake.run(run_id)["state"] in ("COMPLETED", "FAILED")
                and any(r.path == path and r.status is not None for r in fake.requests))
    fake.wait_for(over, 120)
    done = time.time()
    ended = float(end_file.read_text())
    run = fake.run(run_id)
    tasks = [(t["taskName"], t["state"], (t["result"] or {}).get("note")) for t in run["tasks"]]
    intact = (len(tasks) == 3 and all(got[:2] == want[:2] and (want[2] is None or
                                                              got[2] == want[2])
                                      for got, want in zip(tasks, EXPECTED, strict=True))
              and len([r for r in fake.requests if r.path == path]) == 1)
    return done - ended, intact, run["state"]


def main(quick: bool = False) -> list[Row]:
    runs = 1 if quick else 3
    directory = common.work_dir("delivery")
    end_file = directory / "flow-end.txt"
    module = common.write_module(directory, "delivery_flows", FLOWS.format(end=str(end_file)))
    results = []
    with FakePerfect(poll_hold=5.0, extra_cost=0.3, cost_per_mb=0.02) as fake:
        worker = WorkerProcess(module, fake.url, directory)
        try:
            print(f"item 11: run end -> COMPLETED, 300 ms per run write, 50k-line task "
                  f"({runs} runs)", file=sys.stderr)
            for _ in range(runs):
                results.append(_one_run(fake, end_file))
        except Exception:
            print(worker.tail(), file=sys.stderr)
            raise
        finally:
            code = worker.stop()
    seconds = [r[0] for r in results]
    intact = all(r[1] for r in results) and all(r[2] == "COMPLETED" for r in results)
    print_table("11. A run's end at the worker -> COMPLETED at the backend (every run write "
                "300 ms + 20 ms/MB, one at a time; task of 50,000 lines, then a failing "
                "and a quiet task)",
                ["run", "seconds", "states intact", "run state"],
                [[n + 1, f"{s:.2f}", "yes" if ok else "NO", state]
                 for n, (s, ok, state) in enumerate(results)])
    worst = max(seconds)
    return [
        Row("11 delivery", "run end -> COMPLETED, 300 ms/write (max)", "<= 5 s, none lost",
            f"med {statistics.median(seconds):.2f} / max {worst:.2f} s; "
            f"{'none lost' if intact else 'STATE LOST'}; worker exit {code}",
            worst <= 5.0 and intact and code == 0),
    ]


if __name__ == "__main__":
    common.print_rows(main("--quick" in sys.argv))
