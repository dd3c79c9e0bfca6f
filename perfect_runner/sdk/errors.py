"""Exceptions a flow body may see from a task call."""

from __future__ import annotations


class TaskFailed(Exception):
    """A crucial task failed without raising (passed=False, crash, timeout, ...).

    Raised in the flow body so the flow stops, as the reference SDK does. The
    message is the same note the UI shows.
    """

    def __init__(self, task_name: str, note: str) -> None:
        super().__init__(f"Task '{task_name}' failed: {note}")
        self.task_name = task_name
        self.note = note

    def __reduce__(self):  # keep pickling working with the two-argument init
        return (TaskFailed, (self.task_name, self.note))


class TaskTimeout(BaseException):
    """Raised inside a task when its time is up, so `finally` blocks still run.

    A BaseException so that a bare `except Exception` in user code does not
    swallow the stop.
    """


class DefinitionError(ValueError):
    """A @flow or @task definition the runner cannot run; raised when it is decorated.

    The message is one line naming the definition (file:line) and what to change.
    """
