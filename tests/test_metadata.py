"""The flows description from the fork server, parsed once into dataclasses: what
the loader writes reads back field for field, and each kind of bad field is named."""

from __future__ import annotations

from typing import Any

import pytest

from perfect_runner.isolation.metadata import FlowMeta, MetadataError, TaskMeta, parse_metadata
from perfect_runner.sdk.registry import TaskDefinition


def test_what_the_loader_writes_reads_back_as_dataclasses() -> None:
    extract = TaskDefinition(name="extract", func=print, key="m.extract", crucial_pass=False,
                             retries=0, timeout=2.5)
    load = TaskDefinition(name="load", func=print, key="m.load", estimated_time=3000,
                          memory_limit=1 << 20)
    flow = {"name": "ETL", "description": "", "tags": {"team": "data"}, "timeout": 60.0,
            "auto_trigger": False, "auto_trigger_config": "development",
            "tasks": ["m.extract", "m.load"]}  # as loader.describe writes a flow
    meta = parse_metadata({"flows": [flow],
                           "tasks": {t.key: t.options() for t in (extract, load)}})
    assert meta.flows["ETL"] == FlowMeta(name="ETL", tags={"team": "data"}, timeout=60.0,
                                         tasks=("m.extract", "m.load"))
    assert meta.flow_tasks("ETL") == [
        TaskMeta(key="m.extract", name="extract", crucial_pass=False, retries=0, timeout=2.5),
        TaskMeta(key="m.load", name="load", estimated_time=3000, memory_limit=1 << 20)]


def _good() -> dict[str, Any]:
    return {"flows": [{"name": "F", "tasks": ["m.t"]}],
            "tasks": {"m.t": {"key": "m.t", "name": "t"}}}


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = _good()
    target: Any = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return data


BAD = {
    "not an object": ([], "expected an object"),
    "tasks not an object": ({"flows": [], "tasks": []}, "'tasks' is not an object"),
    "crucial_pass a string": (_with(("tasks", "m.t", "crucial_pass"), "yes"),
                              "task 'm.t': 'crucial_pass' is 'yes', not true or false"),
    "negative timeout": (_with(("tasks", "m.t", "timeout"), -1),
                         "task 'm.t': 'timeout' is -1, not a number of seconds >= 0"),
    "retries a bool": (_with(("tasks", "m.t", "retries"), True), "'retries' is True"),
    "key mismatch": (_with(("tasks", "m.t", "key"), "m.u"), "differs from the key"),
    "empty task name": (_with(("tasks", "m.t", "name"), ""), "not a non-empty string"),
    "unknown task key": (_with(("flows", 0, "tasks"), ["m.x"]),
                         "flow 'F': calls task 'm.x', which is not described"),
    "tags not strings": (_with(("flows", 0, "tags"), {"a": 1}), "'tags' is not an object"),
    "flow twice": ({**_good(), "flows": [{"name": "F"}, {"name": "F"}]}, "described twice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_field_is_named(case: str) -> None:
    data, words = BAD[case]
    with pytest.raises(MetadataError) as caught:
        parse_metadata(data)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_the_dataclasses_are_frozen() -> None:
    meta = parse_metadata(_good())
    with pytest.raises(AttributeError):
        meta.tasks["m.t"].crucial_pass = False  # type: ignore[misc]
