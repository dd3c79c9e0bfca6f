"""Definitions of tasks and flows, and the registry that collects them at import."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .checks import where
from .errors import DefinitionError


@dataclass
class TaskDefinition:
    """A function decorated with @task, with its options."""

    name: str
    func: Callable[..., Any]
    key: str
    description: str = ""
    weight: int = 1
    estimated_time: int = 1000
    crucial_pass: bool = True
    timeout: float | None = None
    memory_limit: int | None = None
    retries: int | None = None  # None: the worker's --retries
    retry_delay: float | None = None

    def options(self) -> dict[str, Any]:
        """The task's metadata as JSON-safe values, for the control process."""
        return {
            "key": self.key,
            "name": self.name,
            "description": self.description,
            "weight": self.weight,
            "estimated_time": self.estimated_time,
            "crucial_pass": self.crucial_pass,
            "timeout": self.timeout,
            "memory_limit": self.memory_limit,
            "retries": self.retries,
            "retry_delay": self.retry_delay,
        }


@dataclass
class FlowDefinition:
    """A function decorated with @flow."""

    name: str
    func: Callable[..., Any]
    description: str = ""
    tasks: list[TaskDefinition] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    auto_trigger: bool = False
    auto_trigger_config: str = "development"
    timeout: float | None = None


class WorkflowRegistry:
    """Every flow and task defined by the modules imported so far."""

    def __init__(self) -> None:
        self.flows: dict[str, FlowDefinition] = {}
        self.tasks: dict[str, TaskDefinition] = {}

    def add_task(self, definition: TaskDefinition) -> None:
        # Tasks made by a factory share module and qualname: number the later ones.
        # Every process imports the modules in the same order, so keys agree.
        key, n = definition.key, 1
        while key in self.tasks and self.tasks[key].func is not definition.func:
            n += 1
            key = f"{definition.key}#{n}"
        definition.key = key
        self.tasks[key] = definition

    def add_flow(self, definition: FlowDefinition) -> None:
        first = self.flows.get(definition.name)
        if first is None or first.func is definition.func:
            self.flows[definition.name] = definition
            return
        if where(first.func) == where(definition.func):
            raise DefinitionError(
                f"flow {definition.name!r} at {where(first.func)} was loaded twice, as "
                f"module {first.func.__module__!r} and as {definition.func.__module__!r}: "
                "give each flows file once (as a path or as a module name)")
        raise DefinitionError(
            f"two flows are named {definition.name!r}: one at {where(first.func)}, "
            f"one at {where(definition.func)}; flow names must be unique: rename one")

    def get_flows(self) -> list[FlowDefinition]:
        return list(self.flows.values())

    def get_tasks(self) -> list[TaskDefinition]:
        return list(self.tasks.values())

    def task_for(self, func: Callable[..., Any]) -> TaskDefinition | None:
        """The definition behind a decorated wrapper, or None for other callables."""
        definition = getattr(func, "__perfect_task__", None)
        return definition if isinstance(definition, TaskDefinition) else None


_registry = WorkflowRegistry()


def get_registry() -> WorkflowRegistry:
    return _registry
