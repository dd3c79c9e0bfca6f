"""The flows and tasks the fork server loaded, parsed once from its JSON description.

The description comes from a child process that imported user code, so it is
input: `parse_metadata` checks every field the control process uses and names
the first one that is wrong. After it, the control process reads attributes of
frozen dataclasses, never keys of dicts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class MetadataError(ValueError):
    """The description of the loaded flows is not what the loader writes."""


@dataclass(frozen=True)
class TaskMeta:
    """A task's options from `@task(...)`; None means the worker-wide default."""

    key: str
    name: str
    description: str = ""
    estimated_time: int = 1000
    crucial_pass: bool = True
    timeout: float | None = None
    memory_limit: int | None = None
    retries: int | None = None
    retry_delay: float | None = None


@dataclass(frozen=True)
class FlowMeta:
    """A flow's options from `@flow(...)` and its task keys in call order."""

    name: str
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None
    auto_trigger_config: str = "development"
    tasks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Metadata:
    """Every loaded flow by name and every task by key."""

    flows: Mapping[str, FlowMeta]
    tasks: Mapping[str, TaskMeta]

    def flow_tasks(self, flow_name: str) -> list[TaskMeta]:
        """The flow's tasks in call order, as read from its source."""
        return [self.tasks[key] for key in self.flows[flow_name].tasks]


def parse_metadata(data: Any) -> Metadata:
    """`Metadata` from the loader's JSON, or MetadataError naming the bad field."""
    if not isinstance(data, dict):
        raise MetadataError(f"expected an object, got {type(data).__name__}")
    tasks_raw, flows_raw = data.get("tasks"), data.get("flows")
    if not isinstance(tasks_raw, dict):
        raise MetadataError("'tasks' is not an object")
    if not isinstance(flows_raw, list):
        raise MetadataError("'flows' is not a list")
    tasks = {key: _task(key, raw) for key, raw in tasks_raw.items()}
    flows: dict[str, FlowMeta] = {}
    for number, raw in enumerate(flows_raw):
        flow = _flow(number, raw, tasks)
        if flow.name in flows:
            raise MetadataError(f"flow {flow.name!r} is described twice")
        flows[flow.name] = flow
    return Metadata(flows=flows, tasks=tasks)


def _task(key: Any, raw: Any) -> TaskMeta:
    where = f"task {key!r}"
    if not isinstance(raw, dict):
        raise MetadataError(f"{where} is not an object")
    fields = _Fields(where, raw)
    if fields.text("key") != key:
        raise MetadataError(f"{where}: 'key' differs from the key it is listed under")
    return TaskMeta(
        key=key, name=fields.text("name", empty=False),
        description=fields.text("description"),
        estimated_time=fields.integer("estimated_time", low=0, default=1000),
        crucial_pass=fields.flag("crucial_pass"),
        timeout=fields.seconds("timeout"),
        memory_limit=fields.integer("memory_limit", low=1, optional=True),
        retries=fields.integer("retries", low=0, optional=True),
        retry_delay=fields.seconds("retry_delay"),
    )


def _flow(number: int, raw: Any, tasks: Mapping[str, TaskMeta]) -> FlowMeta:
    where = f"flow #{number}"
    if not isinstance(raw, dict):
        raise MetadataError(f"{where} is not an object")
    fields = _Fields(where, raw)
    name = fields.text("name", empty=False)
    where = f"flow {name!r}"
    tags = raw.get("tags") or {}
    if not isinstance(tags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise MetadataError(f"{where}: 'tags' is not an object of strings")
    keys = raw.get("tasks", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise MetadataError(f"{where}: 'tasks' is not a list of task keys")
    unknown = [k for k in keys if k not in tasks]
    if unknown:
        raise MetadataError(f"{where}: calls task {unknown[0]!r}, which is not described")
    return FlowMeta(
        name=name, description=fields.text("description"), tags=dict(tags),
        timeout=fields.seconds("timeout"),
        # An empty one is the default, as the backend payload always had it.
        auto_trigger_config=fields.text("auto_trigger_config") or "development",
        tasks=tuple(keys),
    )


@dataclass
class _Fields:
    """Typed reads of one object's fields; a missing field reads as its default."""

    where: str
    raw: dict[str, Any]

    def _bad(self, name: str, what: str) -> MetadataError:
        return MetadataError(f"{self.where}: {name!r} is {self.raw.get(name)!r}, not {what}")

    def text(self, name: str, empty: bool = True, default: str = "") -> str:
        value = self.raw.get(name)
        if value is None:
            value = default
        if not isinstance(value, str) or (not empty and not value):
            raise self._bad(name, "a string" if empty else "a non-empty string")
        return value

    def flag(self, name: str) -> bool:
        value = self.raw.get(name, True)
        if not isinstance(value, bool):
            raise self._bad(name, "true or false")
        return value

    def integer(self, name: str, low: int, optional: bool = False,
                default: int | None = None) -> Any:
        """An int >= low; a missing one is `default`, or None when `optional`."""
        value = self.raw.get(name, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self._bad(name, f"an integer >= {low}")
        return value

    def seconds(self, name: str) -> float | None:
        """Seconds >= 0 (as `@task` and `@flow` accept them), or None when missing."""
        value = self.raw.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or math.isnan(value) or value < 0:
            raise self._bad(name, "a number of seconds >= 0")
        return value
