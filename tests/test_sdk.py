"""The SDK user code imports: decorators, registry, result types, sizes. In-process."""

from __future__ import annotations

import os
import pickle

import pytest

from perfect_runner import (
    TaskFailed,
    TaskResult,
    TaskState,
    TaskTimeout,
    flow,
    get_registry,
    report_progress,
    task,
)
from perfect_runner.sdk.units import format_size, parse_size


@task
def plain(x, y=1):
    """Adds two numbers.

    More text that is not the description.
    """
    return {"sum": x + y, "pid": os.getpid()}


@task("Named Task", 250, False, weight=3, timeout=2, memory_limit="512MB", retries=2,
      retry_delay=0.5, description="explicit")
def named():
    report_progress(50)  # a no-op outside a run
    raise KeyError("inside")


@flow("SDK Flow", description="d", tags={"team": "core", "n": 1}, timeout=30)
def sdk_flow():
    plain(1)
    named()


def test_a_task_called_outside_a_flow_run_is_a_plain_in_process_call() -> None:
    assert plain(2, y=3) == {"sum": 5, "pid": os.getpid()}
    with pytest.raises(KeyError, match="inside"):
        named()
    assert plain.__name__ == "plain" and plain.__doc__.startswith("Adds")


def test_a_flow_called_outside_a_run_runs_its_tasks_in_process() -> None:
    with pytest.raises(KeyError):
        sdk_flow()  # the decorator returns the function itself


def test_task_definitions_carry_their_options() -> None:
    definition = plain.__perfect_task__
    assert definition.name == "plain"
    assert definition.description == "Adds two numbers."
    # retries unset: the worker-wide --retries applies (an explicit 0 would override it).
    assert (definition.estimated_time, definition.crucial_pass, definition.retries) == (
        1000, True, None)
    options = named.__perfect_task__.options()
    assert options == {
        "key": f"{__name__}:named", "name": "Named Task", "description": "explicit",
        "weight": 3, "estimated_time": 250, "crucial_pass": False, "timeout": 2.0,
        "memory_limit": 512_000_000, "retries": 2, "retry_delay": 0.5,
    }
    registry = get_registry()
    assert registry.tasks[f"{__name__}:named"] is named.__perfect_task__
    assert registry.task_for(named) is named.__perfect_task__
    assert registry.task_for(print) is None


def test_flow_definitions_are_registered_by_name() -> None:
    definition = get_registry().flows["SDK Flow"]
    assert definition.func is sdk_flow
    assert definition.tags == {"team": "core", "n": "1"}
    assert (definition.description, definition.timeout) == ("d", 30.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"retries": -1}, "retries=-1 must be a non-negative integer"),
    ({"retries": 1.5}, "retries=1.5 must be a non-negative integer"),
    ({"timeout": "soon"}, "timeout='soon' must be a number of seconds"),
    ({"timeout": -1}, "timeout=-1 must be a non-negative number of seconds"),
    ({"memory_limit": "lots"}, "memory size 'lots' is not a size"),
    ({"estimated_time": "fast"}, "estimated_time='fast' must be milliseconds"),
])
def test_bad_task_options_raise_at_decoration(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        task(**kwargs)(lambda: None)


def test_zero_estimated_time_means_the_default() -> None:
    assert task(estimated_time=0)(lambda: None).__perfect_task__.estimated_time == 1000


def test_task_result_and_states() -> None:
    result = TaskResult(passed=False, note="n", table=[{"a": 1}])
    assert result.to_dict() == {"passed": False, "note": "n", "table": [{"a": 1}]}
    assert TaskResult(passed=True).table == []
    assert [s.value for s in TaskState] == ["PENDING", "RUNNING", "COMPLETED", "FAILED",
                                            "RETRYING"]
    assert TaskState.COMPLETED == "COMPLETED"


def test_task_failed_pickles_with_its_fields() -> None:
    error = pickle.loads(pickle.dumps(TaskFailed("load", "crashed: SIGKILL (killed)")))
    assert str(error) == "Task 'load' failed: crashed: SIGKILL (killed)"
    assert (error.task_name, error.note) == ("load", "crashed: SIGKILL (killed)")


def test_task_timeout_is_not_caught_by_except_exception() -> None:
    assert issubclass(TaskTimeout, BaseException) and not issubclass(TaskTimeout, Exception)


@pytest.mark.parametrize("value, size", [
    (1024, 1024), ("512MB", 512_000_000), ("1GiB", 1024**3), (" 1.5 kb ", 1500), ("7", 7),
    (None, None), (2.5e3, 2500),
])
def test_parse_size(value, size) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "MB", "12 parsecs", "-1MB", 0, -5, True, "0"])
def test_parse_size_rejects(value) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


def test_format_size() -> None:
    assert [format_size(v) for v in (None, 512, 1536, 50 * 1024**2, 3 * 1024**4)] == [
        "-", "512 B", "1.5 KiB", "50 MiB", "3072 GiB"]


def test_format_size_keeps_the_sign_of_a_shrinking_size() -> None:
    assert [format_size(v) for v in (-512, -1536, -50 * 1024**2)] == [
        "-512 B", "-1.5 KiB", "-50 MiB"]


def test_report_sizes_use_the_same_formatter_as_the_notes() -> None:
    from perfect_runner.local.report_format import format_bytes
    sizes = (0, 512, 1536, 50 * 1024**2, 231 * 1024**2 + 5, 3 * 1024**4)
    assert [format_bytes(v) for v in sizes] == [format_size(v) for v in sizes]
    assert [format_bytes(v) for v in (None, "12", -1, float("nan"), True)] == ["-"] * 5
