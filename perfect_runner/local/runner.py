"""Local mode: run flows with no backend, show them live, write reports."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from ..executor.engine import FlowExecutor
from ..executor.events import FanOut, RunListener
from ..executor.failed_run import report_failed_run
from ..executor.records import RunRecord
from ..fault_injection import fault_point
from ..sdk.result import TaskState
from ..textsafe import clean_block, clean_text
from .interrupt import Interruption
from .logfile import LogFileListener
from .report_html import write_reports
from .report_index import Index, write_index
from .terminal_view import TerminalView

log = logging.getLogger("perfect_runner.local")


def list_flows(executor: FlowExecutor, out: TextIO = sys.stdout) -> None:
    # Names, tags and descriptions come from user code: cleaned before they are shown.
    for name, flow in executor.flows.items():
        tags = ", ".join(f"{k}={v}" for k, v in flow.tags.items())
        out.write(clean_text(name) + (f"  [{clean_text(tags)}]" if tags else "") + "\n")
        if flow.description:
            out.write(f"    {clean_block(flow.description, '    ')}\n")
        for task in executor.flow_tasks(name):
            crucial = "" if task.crucial_pass else "  (non-crucial)"
            out.write(f"    - {clean_text(task.name)}  ~{task.estimated_time} ms{crucial}\n")


def run_locally(executor: FlowExecutor, flow_names: list[str], log_dir: str, reports_dir: str,
                out: TextIO = sys.stdout, max_log_bytes: int | None = None
                ) -> tuple[list[RunRecord], int | None]:
    """Run each flow in turn; print where its log and reports are.

    Returns the records and the signal that interrupted the runs (None if none did).
    A failure while handling one run fails that run (with its report) and the
    next ones still run: see `FlowRun.execute` and `report_failed_run`.
    """
    view = TerminalView(out)
    records: list[RunRecord] = []
    index: Index | str | None = None
    # The fork server may be replaced during the runs (see isolation.healing).
    with Interruption(lambda: executor.launcher.server_pid) as stop:
        for name in flow_names:
            if stop.signum is not None:
                break
            record = _run_one(executor, name,
                              FanOut(LogFileListener(log_dir, max_log_bytes), view), stop)
            where = _write_reports(record, reports_dir)
            index = _write_index(reports_dir)
            out.write(f"{clean_text(record.flow_name)}: {record.state}  {where}  "
                      f"log: {record.log_path}\n")
            out.flush()
            records.append(record)
        skipped = flow_names[len(records):]
        if stop.signum is not None and skipped:
            out.write(f"{stop.reason}: {len(skipped)} flow(s) not run: "
                      + ", ".join(repr(clean_text(name)) for name in skipped) + "\n")
            out.flush()
    if index is not None:
        _print_index(index, out)
    return records, stop.signum


def _run_one(executor: FlowExecutor, name: str, listener: RunListener,
             stop: Interruption) -> RunRecord:
    try:
        run = executor.new_run(name, listener)
    except Exception as exc:  # noqa: BLE001 - this run fails, the next ones run
        log.exception("run of %r could not be started", name)
        note = f"the runner failed while starting this run: {type(exc).__name__}: {exc}"
        return report_failed_run(listener, name, note)
    stop.attach(run)
    try:
        return run.execute()
    finally:
        stop.attach(None)


def _write_reports(record: RunRecord, reports_dir: str) -> str:
    """Write the run's reports; if that fails, the run is FAILED and written again."""
    try:
        fault_point("local.report", record.flow_name, record.run_id)
        html, json_path = write_reports(record, reports_dir)
        return f"report: {html}  record: {json_path}"
    except Exception as exc:  # noqa: BLE001 - the next runs still go on
        log.exception("could not write the report of run %s", record.run_id)
        record.state = TaskState.FAILED
        record.note = (f"the runner failed while writing this run's report: "
                       f"{type(exc).__name__}: {exc}")
    try:
        html, json_path = write_reports(record, reports_dir)
        return f"report: {html}  record: {json_path}"
    except Exception as exc:  # noqa: BLE001
        return f"report NOT written ({type(exc).__name__}: {exc})"


def _write_index(reports_dir: str) -> Index | str:
    """Rewrite reports/index.html; if that fails, say why: the runs are not affected."""
    try:
        return write_index(reports_dir)
    except Exception as exc:  # noqa: BLE001 - the reports of each run are written already
        log.exception("could not write the index of %s", reports_dir)
        return f"index NOT written ({type(exc).__name__}: {exc})"


def _print_index(index: Index | str, out: TextIO) -> None:
    if isinstance(index, str):
        out.write(f"All runs: {index}\n")
        out.flush()
        return
    out.write(f"All runs: {index.path} ({index.runs} runs)\n")
    if index.skipped:
        names = ", ".join(clean_text(name) for name, _ in index.skipped[:5])
        more = f" and {len(index.skipped) - 5} more" if len(index.skipped) > 5 else ""
        out.write(f"    {len(index.skipped)} JSON files in {index.path.parent} are not run "
                  f"records and are not listed: {names}{more} (reasons in the index)\n")
    out.flush()
