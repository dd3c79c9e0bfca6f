"""Item 8: scale-out, 4 workers x --concurrency 2 on one fake backend.

    python bench/scale_out.py [--quick]

The fake (poll_hold 2 s) gets N library entries of a one-task flow (N POST /api/flows
before the workers start; a run consumes its entry), 4 worker processes start and
register, and once all 4 are long-polling, all N entries are triggered by id
(POST /api/engine/trigger/{id}), N = 400 (80 quick). Throughput is runs/s from the
first trigger to the last POST complete the fake received. Checks: every run
COMPLETED at the fake, exactly one complete POST and one COMPLETED task update per
run, one execution per run (the task appends a line per execution to a file).
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import common
import requests
from common import Row, print_table
from http_cost import FakePerfect, WorkerProcess, wait_registered

WORKERS = 4
CONCURRENCY = 2

FLOWS = '''
import os

from perfect_runner import flow, task

EXECUTIONS = {executions!r}


@task(name="short")
def short():
    with open(EXECUTIONS, "a") as out:
        out.write(f"{{os.getpid()}}\\n")


@flow()
def tiny():
    short()
'''


def main(quick: bool = False) -> list[Row]:
    runs_wanted = 80 if quick else 400
    directory = common.work_dir("scale")
    executions = directory / "executions.txt"
    module = common.write_module(directory, "scale_flows",
                                 FLOWS.format(executions=str(executions)))
    body = {"name": "tiny", "description": "", "tags": {},
            "tasks": [{"name": "short", "description": "", "estimatedTime": 1000,
                       "crucialPass": True}],
            "autoTrigger": False, "autoTriggerConfig": "development"}
    with FakePerfect(poll_hold=2.0) as fake, requests.Session() as http:
        ids = [http.post(f"{fake.url}/api/flows", json=body).json()["flow"]["id"]
               for _ in range(runs_wanted)]
        workers = [WorkerProcess(module, fake.url, directory, "--concurrency", str(CONCURRENCY),
                                 name=f"worker{i}") for i in range(WORKERS)]
        try:
            wait_registered(fake, "tiny")
            fake.wait_for(lambda: fake.waiting_pollers >= WORKERS, timeout=30)
            print(f"item 8: {runs_wanted} runs on {WORKERS} workers x {CONCURRENCY}",
                  file=sys.stderr)
            start = time.monotonic()
            run_ids = [http.post(f"{fake.url}/api/engine/trigger/{i}", json={}).json()["runId"]
                       for i in ids]
            triggered = time.monotonic()
            wanted = set(run_ids)

            def all_done() -> bool:
                runs = fake.runs
                return all(runs[r]["state"] in ("COMPLETED", "FAILED") for r in wanted)
            fake.wait_for(all_done, timeout=120)
            fake.wait_for(lambda: len({r.path.split("/")[3] for r in
                                       fake.requests_to("/api/runs/*/complete", "POST")
                                       if r.status is not None} & wanted) == len(wanted),
                          timeout=30)
            time.sleep(1.0)  # anything executed twice would show up meanwhile
            alive = sum(w.proc.poll() is None for w in workers)
        except Exception:
            for w in workers:
                print(w.tail(5), file=sys.stderr)
            raise
        finally:
            for w in workers:
                w.stop()
        runs = fake.runs
        completes = [r for r in fake.requests_to("/api/runs/*/complete", "POST")
                     if r.path.split("/")[3] in wanted]
        states = [r for r in fake.requests_to("/api/runs/*/tasks/*/state", "POST")
                  if r.path.split("/")[3] in wanted]

    last = max(r.time for r in completes)
    seconds = last - start
    per_run_complete = Counter(r.path.split("/")[3] for r in completes)
    per_run_final = Counter(r.path.split("/")[3] for r in states
                            if isinstance(r.body, dict) and r.body.get("state") == "COMPLETED")
    per_run_first = Counter(r.path.split("/")[3] for r in states
                            if isinstance(r.body, dict) and r.body.get("state") == "RUNNING")
    executed = len(executions.read_text().splitlines()) if executions.exists() else 0
    completed = sum(runs[r]["state"] == "COMPLETED" for r in wanted)
    once = (all(per_run_complete[r] == 1 for r in wanted)
            and all(per_run_final[r] == 1 for r in wanted)
            and all(per_run_first[r] >= 1 for r in wanted))
    lost = len(wanted) - completed
    rate = len(wanted) / seconds
    print_table(f"8. Scale-out: {len(wanted)} queued runs of a one-task flow, {WORKERS} workers "
                f"x --concurrency {CONCURRENCY}, fake poll_hold 2 s",
                ["runs", "trigger s", "first trigger -> last complete s", "runs/s",
                 "COMPLETED", "task executions", "complete POSTs", "COMPLETED updates",
                 "exactly once", "lost"],
                [[len(wanted), triggered - start, seconds, rate, completed, executed,
                  len(completes), sum(per_run_final.values()), "yes" if once else "NO", lost]])
    ok = once and lost == 0 and executed == len(wanted) and alive == WORKERS
    return [
        Row("8 scale-out", f"runs/s, {WORKERS} workers x {CONCURRENCY}", "-",
            f"{rate:.1f} ({len(wanted)} runs in {seconds:.1f} s)", None),
        Row("8 scale-out", "each run exactly once, none lost", "yes / 0 lost",
            f"{'yes' if once else 'NO'} / {lost} lost / {executed} executions", ok),
    ]


if __name__ == "__main__":
    common.print_rows(main("--quick" in sys.argv))
