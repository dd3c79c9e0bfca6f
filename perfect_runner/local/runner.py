"""Local mode: run flows with no backend, show them live, write reports."""

from __future__ import annotations

import sys
from typing import TextIO

from ..executor.engine import FlowExecutor
from ..executor.events import FanOut
from ..executor.records import RunRecord
from .logfile import LogFileListener
from .report_html import write_reports
from .terminal_view import TerminalView


def list_flows(executor: FlowExecutor, out: TextIO = sys.stdout) -> None:
    for name, flow in executor.flows.items():
        tags = ", ".join(f"{k}={v}" for k, v in (flow.get("tags") or {}).items())
        out.write(f"{name}" + (f"  [{tags}]" if tags else "") + "\n")
        if flow.get("description"):
            out.write(f"    {flow['description']}\n")
        for task in executor.flow_tasks(name):
            crucial = "" if task["crucial_pass"] else "  (non-crucial)"
            out.write(f"    - {task['name']}  ~{task['estimated_time']} ms{crucial}\n")


def run_locally(executor: FlowExecutor, flow_names: list[str], log_dir: str, reports_dir: str,
                out: TextIO = sys.stdout) -> list[RunRecord]:
    """Run each flow in turn; print where its log and reports are."""
    view = TerminalView(out)
    records = []
    for name in flow_names:
        listener = FanOut(LogFileListener(log_dir), view)
        record = executor.new_run(name, listener).execute()
        html, json_path = write_reports(record, reports_dir)
        out.write(f"{record.flow_name}: {record.state}  report: {html}  record: {json_path}"
                  f"  log: {record.log_path}\n")
        out.flush()
        records.append(record)
    return records
