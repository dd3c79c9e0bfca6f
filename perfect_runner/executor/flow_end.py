"""How a flow process (or the runner around it) came to an end, in the words of a
run's note: the flow process gone under a task, dead before the flow finished,
or the runner itself failing.
"""

from __future__ import annotations

import signal
import traceback
from pathlib import Path

from ..isolation.child_process import ChildProcess
from ..isolation.launcher import ExitInfo
from ..isolation.outcome import Kind, describe_signal


def flow_lost(flow: ChildProcess) -> tuple[Kind, str] | None:
    """Why a task must stop because its flow process is gone; None while it runs."""
    if flow.running:
        return None
    info = flow.exit or ExitInfo(None)
    if info.server_died:
        return Kind.FLOW_LOST, f"the fork server died ({info.server_died})"
    how = (f"killed by {signal_words(info.signal)}" if info.signal
           else f"exited with code {info.code}")
    return Kind.FLOW_LOST, f"the flow process is gone ({how})"


def flow_death_note(flow: ChildProcess) -> str:
    """Why the run failed when its flow process ended before the flow finished."""
    info = flow.exit
    if flow.protocol_error:
        why = f"flow process broke the runner protocol: {flow.protocol_error}"
    elif info and info.server_died:
        why = (f"the fork server died ({info.server_died}); the flow process and its "
               "task processes died with it")
    elif info and info.signal:
        why = f"flow process killed by {signal_words(info.signal)} before the flow finished"
    else:
        code = info.code if info else None
        why = f"flow process exited with code {code} before the flow finished"
    if flow.stderr_tail:
        why += "; last stderr: " + " | ".join(list(flow.stderr_tail)[-3:])
    return why


def signal_words(signum: int) -> str:
    """"SIGKILL" for a kill, "SIGSEGV (segmentation fault)" for a crash."""
    return "SIGKILL" if signum == signal.SIGKILL else describe_signal(signum)


def describe_exception(exc: BaseException) -> str:
    """What broke and where: "KeyError: 'x' (in flow_run.py:120 _call_task)"."""
    origin = exc.__cause__ or exc
    frames = [f for f in traceback.extract_tb(origin.__traceback__)
              if not f.filename.endswith("fault_injection.py")]
    where = f" (in {Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name})" \
        if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"
