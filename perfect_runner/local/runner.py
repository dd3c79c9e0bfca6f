"""Local mode: run flows with no backend, show them live, write reports."""

from __future__ import annotations

import sys
from typing import TextIO

from ..executor.engine import FlowExecutor
from ..executor.events import FanOut
from ..executor.records import RunRecord
from ..textsafe import clean_block, clean_text
from .interrupt import Interruption
from .logfile import LogFileListener
from .report_html import write_reports
from .terminal_view import TerminalView


def list_flows(executor: FlowExecutor, out: TextIO = sys.stdout) -> None:
    # Names, tags and descriptions come from user code: cleaned before they are shown.
    for name, flow in executor.flows.items():
        tags = ", ".join(f"{k}={v}" for k, v in (flow.get("tags") or {}).items())
        out.write(clean_text(name) + (f"  [{clean_text(tags)}]" if tags else "") + "\n")
        if flow.get("description"):
            out.write(f"    {clean_block(flow['description'], '    ')}\n")
        for task in executor.flow_tasks(name):
            crucial = "" if task["crucial_pass"] else "  (non-crucial)"
            out.write(f"    - {clean_text(task['name'])}  ~{task['estimated_time']} ms"
                      f"{crucial}\n")


def run_locally(executor: FlowExecutor, flow_names: list[str], log_dir: str, reports_dir: str,
                out: TextIO = sys.stdout, max_log_bytes: int | None = None
                ) -> tuple[list[RunRecord], int | None]:
    """Run each flow in turn; print where its log and reports are.

    Returns the records and the signal that interrupted the runs (None if none did).
    """
    view = TerminalView(out)
    records: list[RunRecord] = []
    with Interruption(executor.launcher.server_pid) as stop:
        for name in flow_names:
            if stop.signum is not None:
                break
            run = executor.new_run(name, FanOut(LogFileListener(log_dir, max_log_bytes), view))
            stop.attach(run)
            try:
                record = run.execute()
            finally:
                stop.attach(None)
            html, json_path = write_reports(record, reports_dir)
            out.write(f"{clean_text(record.flow_name)}: {record.state}  report: {html}  "
                      f"record: {json_path}  log: {record.log_path}\n")
            out.flush()
            records.append(record)
        skipped = flow_names[len(records):]
        if stop.signum is not None and skipped:
            out.write(f"{stop.reason}: {len(skipped)} flow(s) not run: "
                      + ", ".join(repr(clean_text(name)) for name in skipped) + "\n")
            out.flush()
    return records, stop.signum
