"""Import the user's flows modules and describe them as JSON.

Runs only in child processes (the fork server, or a spawned child): the control
process never imports user code. It learns what the modules define from
`describe()`'s JSON.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import textwrap
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from ..sdk.errors import DefinitionError
from ..sdk.registry import FlowDefinition, TaskDefinition, WorkflowRegistry, get_registry
from .tracebacks import is_runner_file


class ModuleLoadError(Exception):
    """One line naming the module and what went wrong while importing it."""


def load_modules(specs: list[str]) -> list[ModuleType]:
    """Import each spec: a dotted module name or a path to a .py file.

    Every process that loads the flows (the fork server, a spawned child) calls
    this with the same specs in the same order, so each module gets the same
    name, and each task the same key, everywhere.
    """
    names = _PathNames()
    return [_load_one(spec, names) for spec in specs]


def _load_one(spec: str, names: _PathNames) -> ModuleType:
    try:
        if spec.endswith(".py") or os.sep in spec:
            return _load_path(Path(spec), names)
        return importlib.import_module(spec)
    except ModuleLoadError:
        raise
    except DefinitionError as exc:
        raise ModuleLoadError(f"in flows module {spec!r}: {exc}") from None
    except BaseException as exc:  # noqa: BLE001 - a user module may raise anything
        raise ModuleLoadError(_import_failure(spec, exc)) from None


class _PathNames:
    """The module name of each flows file given by path.

    A file is named by its stem (`flows.py` -> `flows`), as `python flows.py`'s
    sibling imports expect, unless an earlier file already took that stem, or the
    stem is a standard library module it would shadow: then the stem plus a hash
    of the file's path. So `team_a/flows.py` and `team_b/flows.py` become two
    modules, and a task's key (module:qualname) says which file it is in.
    """

    def __init__(self) -> None:
        self.taken: dict[str, Path] = {}

    def name_for(self, path: Path) -> str:
        name = path.stem
        if self.taken.get(name, path) != path or name in sys.stdlib_module_names:
            digest = hashlib.sha1(str(path).encode("utf-8", "surrogatepass")).hexdigest()[:8]
            name = f"{path.stem}_{digest}"
        self.taken[name] = path
        return name


def _load_path(path: Path, names: _PathNames) -> ModuleType:
    if not path.is_file():
        raise ModuleLoadError(f"cannot import flows module {str(path)!r}: no such file")
    path = path.resolve()
    # Sibling imports in the user's file should work as they do with `python file.py`.
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    name = names.name_for(path)
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded  # given twice, or already imported by an earlier flows module
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModuleLoadError(f"cannot import flows module {str(path)!r}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def _import_failure(spec: str, exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name and spec.startswith(exc.name):
        return f"cannot import flows module {spec!r}: no module named {exc.name!r}"
    if isinstance(exc, SyntaxError):
        # Where the bad code is (file, line), not where the import machinery noticed it.
        where = f"{exc.filename}:{exc.lineno}" if exc.filename else f"line {exc.lineno}"
        return f"cannot import flows module {spec!r}: {type(exc).__name__} at {where}: {exc.msg}"
    where = ""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if not frame.filename.startswith("<frozen") and not is_runner_file(frame.filename)]
    if frames:
        last = frames[-1]
        where = f" (at {Path(last.filename).name}:{last.lineno})"
    return f"cannot import flows module {spec!r}: {type(exc).__name__}: {exc}{where}"


def describe(registry: WorkflowRegistry | None = None) -> dict[str, Any]:
    """Every flow (with its task keys in call order) and every task's options."""
    registry = registry or get_registry()
    return {
        "flows": [_describe_flow(f, registry) for f in registry.get_flows()],
        "tasks": {t.key: t.options() for t in registry.get_tasks()},
    }


def _describe_flow(flow: FlowDefinition, registry: WorkflowRegistry) -> dict[str, Any]:
    tasks = tasks_in_call_order(flow, registry)
    flow.tasks = tasks
    return {
        "name": flow.name,
        "description": flow.description,
        "tags": flow.tags,
        "timeout": flow.timeout,
        "auto_trigger": flow.auto_trigger,
        "auto_trigger_config": flow.auto_trigger_config,
        "tasks": [t.key for t in tasks],
    }


def tasks_in_call_order(flow: FlowDefinition, registry: WorkflowRegistry) -> list[TaskDefinition]:
    """The registered tasks the flow body calls, in source order, each listed once.

    Nested calls count innermost first (`load(clean(extract()))` lists extract,
    clean, load), which is the order they run in.
    """
    try:
        source = textwrap.dedent(inspect.getsource(flow.func))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return []
    names = _CallOrder()
    names.visit(tree)
    scope = {**getattr(flow.func, "__globals__", {}), **_closure_vars(flow.func)}
    ordered: dict[str, TaskDefinition] = {}
    for name in names.calls:
        definition = registry.task_for(_resolve(name, scope))
        if definition is not None and definition.key not in ordered:
            ordered[definition.key] = definition
    return list(ordered.values())


class _CallOrder(ast.NodeVisitor):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self._depth = 0

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        # Only the flow function's own body: nested defs are not calls.
        self._depth += 1
        if self._depth == 1:
            self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Call(self, node: ast.Call) -> None:
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            self.visit(arg)
        dotted = _dotted(node.func)
        if dotted:
            self.calls.append(dotted)
        else:
            self.visit(node.func)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _resolve(dotted: str, scope: dict[str, Any]) -> Any:
    head, *rest = dotted.split(".")
    value = scope.get(head)
    for attr in rest:
        value = getattr(value, attr, None)
    return value


def _closure_vars(func: Any) -> dict[str, Any]:
    try:
        return dict(inspect.getclosurevars(func).nonlocals)
    except (TypeError, ValueError):
        return {}
