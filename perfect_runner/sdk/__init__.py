"""SDK layer: what user code imports (decorators, result types, the registry)."""

from .decorators import flow, task
from .registry import FlowDefinition, TaskDefinition, WorkflowRegistry, get_registry
from .result import TaskResult, TaskState
from .runtime import report_progress

__all__ = [
    "FlowDefinition",
    "TaskDefinition",
    "TaskResult",
    "TaskState",
    "WorkflowRegistry",
    "flow",
    "get_registry",
    "report_progress",
    "task",
]
