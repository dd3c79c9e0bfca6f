"""Field checks for protocol messages: what a header value may be, and why not.

Each message class in `protocol` declares a `SCHEMA` mapping its fields to
these checks. A check returns None for a good value, else a short phrase
saying what the value should have been; `framing.decode_header` turns that
into the ProtocolError that ends the sender's attempt. Values come from
`json.loads`, so they are already JSON types: the checks are about which type,
which range and how big.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

MAX_DEPTH = 64  # nesting of a table (json_safe cuts deeper values on the child side)


class Check:
    """A rule for one header field."""

    def problem(self, value: Any) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class Text(Check):
    max_len: int

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return "a string"
        if len(value) > self.max_len:
            return f"a string of at most {self.max_len:,} characters (got {len(value):,})"
        return None


@dataclass(frozen=True)
class Number(Check):
    low: float
    high: float
    KINDS: ClassVar[tuple[type, ...]] = (int, float)
    WORD: ClassVar[str] = "a number"

    def problem(self, value: Any) -> str | None:
        # bool is an int in Python, never in the protocol.
        if not isinstance(value, self.KINDS) or isinstance(value, bool):
            return self.WORD
        # isfinite only on floats: a huge int would overflow it.
        finite = not isinstance(value, float) or math.isfinite(value)
        if not finite or not self.low <= value <= self.high:
            return f"{self.WORD} from {_bound(self.low)} to {_bound(self.high)}"
        return None


@dataclass(frozen=True)
class Integer(Number):
    KINDS: ClassVar[tuple[type, ...]] = (int,)
    WORD: ClassVar[str] = "an integer"


def _bound(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Flag(Check):
    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else "true or false"


@dataclass(frozen=True)
class Choice(Check):
    values: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        return None if value in self.values else "one of " + ", ".join(self.values)


@dataclass(frozen=True)
class JsonObject(Check):
    """A JSON object with string keys and finite JSON values, nested at most MAX_DEPTH."""

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, dict):
            return "a JSON object"
        wrong = _json_problem(value, 0)
        return f"a JSON object of JSON values (it {wrong})" if wrong else None


@dataclass(frozen=True)
class Table(Check):
    """A list of rows, each a JSON object: what the backend and the reports show."""

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, list):
            return "a list of JSON objects"
        for number, row in enumerate(value):
            if not isinstance(row, dict):
                return f"a list of JSON objects (row {number} is {_kind(row)})"
            if (wrong := _json_problem(row, 1)) is not None:
                return f"a list of JSON objects of JSON values (row {number} {wrong})"
        return None


def _json_problem(value: Any, depth: int) -> str | None:
    if depth > MAX_DEPTH:
        return f"is nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, float) and not math.isfinite(value):
        return "holds a number that is not finite"
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return None  # json.loads made it: str, int, float, bool or None
    for item in items:
        if isinstance(item, dict | list | float) and (wrong := _json_problem(item, depth + 1)):
            return wrong
    return None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def describe(value: Any, limit: int = 40) -> str:
    """A short, printable picture of a bad value for an error message."""
    text = repr(value)
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text):,} characters)"
    return f"{type(value).__name__} {text}"
