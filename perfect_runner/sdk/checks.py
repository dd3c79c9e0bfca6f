"""What a @flow or @task definition must be, checked when it is decorated.

A definition the runner could not run properly is refused at import, with a
`DefinitionError` naming it, so the mistake shows up as a usage error when the
runner starts rather than as a run that silently does nothing:

- the function must be a plain function: an `async def` or generator function
  called in a flow process only creates a coroutine or generator object, and
  the flow would COMPLETE with none of its tasks run;
- the name must be one the worker accepts in an execution request (see
  `perfect_runner.names`), or the worker would register a flow it then refuses.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from ..names import name_problem
from .errors import DefinitionError


def check_definition(kind: str, name: Any, func: Callable[..., Any]) -> None:
    """Raise `DefinitionError` when `func` cannot be a flow/task called `name`."""
    if not callable(func):
        raise DefinitionError(f"@{kind} decorates {func!r}, which is not a function")
    if not isinstance(name, str):
        raise DefinitionError(f"{kind} at {where(func)}: name={name!r} must be a string")
    style = _unsupported_style(func)
    if style:
        what, instead = style
        raise DefinitionError(
            f"{kind} {_shown(name)} at {where(func)} is {what}: perfect_runner runs flows "
            f"and tasks as plain functions; write it with plain 'def' and {instead}")
    problem = name_problem(name)
    if problem:
        raise DefinitionError(f"{kind} name {_shown(name)} at {where(func)} {problem}; the "
                              f"Perfect worker would refuse to run it: choose another name")


def _unsupported_style(func: Callable[..., Any]) -> tuple[str, str] | None:
    """(what the function is, what to write instead) for the styles we refuse."""
    if inspect.isasyncgenfunction(func):
        return "an async generator function", "return a list instead of yielding"
    if inspect.iscoroutinefunction(func):
        return "an 'async def' function", "call asyncio.run(...) inside it"
    if inspect.isgeneratorfunction(func):
        return "a generator function (it uses yield)", "return a list instead of yielding"
    return None


def where(func: Callable[..., Any]) -> str:
    """file:line of a function's definition, the file relative to the cwd when inside it."""
    code = getattr(inspect.unwrap(func), "__code__", None)
    if code is None:
        return getattr(func, "__qualname__", repr(func))
    path = code.co_filename
    try:
        relative = os.path.relpath(path)
        path = path if relative.startswith("..") else relative
    except ValueError:
        pass
    return f"{path}:{code.co_firstlineno}"


def _shown(name: str) -> str:
    # repr() shows control characters as escapes; a long name is shown by its start.
    return repr(name if len(name) <= 60 else name[:60]) + ("..." if len(name) > 60 else "")
