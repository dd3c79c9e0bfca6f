"""The executor's entry point: load the flows (in a child), start runs of them.

`FlowExecutor` owns the launcher (fork server or spawn) and the flows' metadata,
parsed once by the launcher into `isolation.metadata`'s dataclasses. It is shared
by local mode and the worker; each run gets its own `FlowRun` on the caller's thread.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping

from ..fault_injection import fault_point
from ..isolation.healing import start_launcher
from ..isolation.launcher import Launcher
from ..isolation.metadata import FlowMeta, Metadata, TaskMeta
from .events import RunListener
from .flow_run import FlowRun
from .options import RunOptions
from .records import RunRecord


class FlowExecutor:
    def __init__(self, modules: list[str], start_method: str = "forkserver",
                 options: RunOptions | None = None, env: dict[str, str] | None = None,
                 sandbox: str = "auto") -> None:
        self.options = options or RunOptions()
        self.launcher: Launcher = start_launcher(start_method, modules,
                                                 dict(os.environ if env is None else env),
                                                 sandbox)
        self.metadata: Metadata = self.launcher.metadata
        self.flows: Mapping[str, FlowMeta] = self.metadata.flows
        self.tasks: Mapping[str, TaskMeta] = self.metadata.tasks

    def flow_tasks(self, flow_name: str) -> list[TaskMeta]:
        """The flow's tasks in call order, as read from its source."""
        return self.metadata.flow_tasks(flow_name)

    def new_run(self, flow_name: str, listener: RunListener, run_id: str | None = None) -> FlowRun:
        run_id = run_id or f"local-{uuid.uuid4().hex[:8]}"
        fault_point("engine.new_run", flow_name, run_id)
        flow = self.flows[flow_name]
        record = RunRecord(
            run_id=run_id, flow_name=flow_name,
            description=flow.description, tags=dict(flow.tags),
            declared_tasks=[task.name for task in self.flow_tasks(flow_name)],
        )
        return FlowRun(record, flow, self.tasks, self.launcher, listener, self.options)

    def close(self) -> None:
        self.launcher.close()
