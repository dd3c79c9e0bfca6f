"""perfect_runner: a Perfect worker that runs every task in its own isolated process.

User code imports only the SDK names below, exactly as with Perfect's reference SDK.
"""

from .sdk import (
    FlowDefinition,
    TaskDefinition,
    TaskResult,
    TaskState,
    WorkflowRegistry,
    flow,
    get_registry,
    report_progress,
    task,
)
from .sdk.errors import TaskFailed, TaskTimeout

__all__ = [
    "FlowDefinition",
    "TaskDefinition",
    "TaskFailed",
    "TaskResult",
    "TaskState",
    "TaskTimeout",
    "WorkflowRegistry",
    "flow",
    "get_registry",
    "report_progress",
    "task",
]
__version__ = "0.1.0"
