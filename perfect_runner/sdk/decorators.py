"""@task and @flow: the same signatures as Perfect's reference SDK, plus isolation options."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from . import runtime
from .checks import check_definition
from .registry import FlowDefinition, TaskDefinition, get_registry
from .units import parse_size


def task(
    name: str | Callable[..., Any] | None = None,
    estimated_time: int = 1000,
    crucial_pass: bool = True,
    *,
    description: str | None = None,
    weight: int = 1,
    timeout: float | None = None,
    memory_limit: int | str | None = None,
    retries: int | None = None,
    retry_delay: float | None = None,
) -> Any:
    """Mark a function as a task; each call in a flow run gets its own process.

    Works as `@task` and `@task(...)`. Called outside a flow run, the task is a
    plain function call, so tasks can be unit-tested directly.
    """
    if callable(name):
        return task()(name)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        check_definition("task", name or func.__name__, func)
        definition = TaskDefinition(
            name=name or func.__name__,
            func=func,
            key=f"{func.__module__}:{func.__qualname__}",
            description=description if description is not None else _first_doc_line(func),
            weight=weight,
            estimated_time=_positive_ms(estimated_time),
            crucial_pass=bool(crucial_pass),
            timeout=_optional_seconds("timeout", timeout),
            memory_limit=parse_size(memory_limit),
            retries=None if retries is None else _non_negative_int("retries", retries),
            retry_delay=_optional_seconds("retry_delay", retry_delay),
        )
        get_registry().add_task(definition)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            active = runtime.current()
            if active is None:
                return func(*args, **kwargs)
            return active.call_task(definition, args, kwargs)

        wrapper.__perfect_task__ = definition  # type: ignore[attr-defined]
        return wrapper

    return decorate


def flow(
    name: str | None = None,
    description: str = "",
    auto_trigger: bool = False,
    auto_trigger_config: str = "development",
    tags: dict[str, str] | None = None,
    *,
    timeout: float | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a function as a flow: its body calls tasks, in order."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        check_definition("flow", name or func.__name__, func)
        definition = FlowDefinition(
            name=name or func.__name__,
            func=func,
            description=description,
            tags={str(k): str(v) for k, v in (tags or {}).items()},
            auto_trigger=auto_trigger,
            auto_trigger_config=auto_trigger_config,
            timeout=_optional_seconds("timeout", timeout),
        )
        get_registry().add_flow(definition)
        func.__perfect_flow__ = definition  # type: ignore[attr-defined]
        return func

    return decorate


def _first_doc_line(func: Callable[..., Any]) -> str:
    doc = (func.__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def _positive_ms(value: Any) -> int:
    # The backend turns 0 into 1000 too; do it here so every view agrees.
    try:
        ms = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"estimated_time={value!r} must be milliseconds (an int)") from None
    return ms if ms > 0 else 1000


def _optional_seconds(option: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{option}={value!r} must be a number of seconds") from None
    if seconds < 0 or seconds != seconds:
        raise ValueError(f"{option}={value!r} must be a non-negative number of seconds")
    return seconds


def _non_negative_int(option: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{option}={value!r} must be a non-negative integer")
    return value
