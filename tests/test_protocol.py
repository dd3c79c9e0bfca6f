"""Pure parts of the isolation layer, no child process: the frame reader, the
line splitter, the supervisor's deadline step and the AST task order."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import struct
from typing import Any

import pytest

from perfect_runner import task
from perfect_runner.isolation.framing import FrameReader, encode_frame, recv_message, send_message
from perfect_runner.isolation.lines import CONTINUED, LineSplitter
from perfect_runner.isolation.loader import tasks_in_call_order
from perfect_runner.isolation.protocol import (
    MAX_HEADER,
    NOTE_MAX,
    CallTask,
    ChannelClosed,
    Conversation,
    FlowFinished,
    FlowRaised,
    Message,
    Progress,
    ProtocolError,
    RunTask,
    StartFlow,
    TaskRaised,
    TaskReply,
    TaskReturned,
    TaskUnsendable,
)
from perfect_runner.isolation.supervisor import Deadlines
from perfect_runner.sdk.registry import FlowDefinition, get_registry

# --- frames -------------------------------------------------------------------------


def test_frame_round_trip_keeps_header_fields_and_blob_opaque() -> None:
    message = RunTask(key="m:f", name="f", index=3, attempt=2, max_result=10)
    blob = bytes(range(256)) * 4
    (got,) = list(FrameReader().feed(encode_frame(message, blob)))
    assert got == (message, blob)


def test_frames_fed_one_byte_at_a_time_come_out_whole() -> None:
    data = (encode_frame(Progress(percent=5)) + encode_frame(CallTask(key="k", name="n"), b"xy")
            + encode_frame(FlowFinished()))
    reader, frames = FrameReader(), []
    for i in range(len(data)):
        frames.extend(reader.feed(data[i:i + 1]))
    assert frames == [(Progress(percent=5), b""), (CallTask(key="k", name="n"), b"xy"),
                      (FlowFinished(), b"")]
    assert reader.pending() == 0


def test_several_frames_in_one_chunk_and_a_partial_one_pending() -> None:
    one = encode_frame(TaskReturned(result_type="int"), b"1")
    reader = FrameReader()
    assert len(list(reader.feed(one + one + one[:7]))) == 2
    assert reader.pending() == 7  # a truncated frame, if the stream ends here
    assert list(reader.feed(one[7:])) == [(TaskReturned(result_type="int"), b"1")]


def test_oversized_frames_are_refused_before_buffering() -> None:
    reader = FrameReader(max_blob=100)
    with pytest.raises(ProtocolError, match="payload of 101 bytes exceeds 100"):
        list(reader.feed(struct.pack(">II", 2, 101)))  # only the prefix has arrived
    with pytest.raises(ProtocolError, match="header of"):
        list(FrameReader().feed(struct.pack(">II", MAX_HEADER + 1, 0)))
    with pytest.raises(ProtocolError, match="payload of 101 bytes exceeds 100"):
        encode_frame(FlowFinished(), b"x" * 101, max_blob=100)


@pytest.mark.parametrize(("header", "why"), [
    (b"not json", "malformed frame header: Expecting value"),
    (b'{"type": "no_such_type"}', "unknown frame type str 'no_such_type'"),
    (b"[1]", "malformed frame header: list [1], not a JSON object"),
    (b'{"type": "progress"}', "progress frame lacks percent"),
    (b"\xff\xfe\x00garbage", "malformed frame header"),
    (b"[" * 100_000 + b"]" * 100_000, "malformed frame header: maximum recursion depth"),
])
def test_malformed_headers_are_protocol_errors(header: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(why)):
        list(FrameReader().feed(struct.pack(">II", len(header), 0) + header))


def frame_of(header: dict[str, Any]) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack(">II", len(raw), 0) + raw


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


BIG = "x" * (NOTE_MAX + 1)


@pytest.mark.parametrize(("header", "why"), [
    ({"type": "progress", "percent": "abc"}, "progress.percent must be a number, got str 'abc'"),
    ({"type": "progress", "percent": True}, "progress.percent must be a number, got bool True"),
    ({"type": "progress", "percent": 101}, "progress.percent must be a number from 0 to 100"),
    ({"type": "progress", "percent": 5, "extra": 1}, "progress frame has unknown keys"),
    ({"type": "task_returned", "result_type": "int", "table": 5},
     "task_returned.table must be a list of JSON objects, got int 5"),
    ({"type": "task_returned", "result_type": "int", "table": [1, 2]},
     "task_returned.table must be a list of JSON objects (row 0 is a number)"),
    ({"type": "task_returned", "result_type": "int", "table": [{"a": _nested(70)}]},
     "(row 0 is nested deeper than 64 levels)"),
    ({"type": "task_returned", "result_type": "int", "peak_rss": "lots"},
     "task_returned.peak_rss must be an integer, got str 'lots'"),
    ({"type": "task_returned", "result_type": "int", "peak_rss": -1},
     "task_returned.peak_rss must be an integer from 0"),
    ({"type": "task_returned", "result_type": "int", "passed": 1},
     "task_returned.passed must be true or false, got int 1"),
    ({"type": "task_returned", "result_type": "int", "note": BIG},
     f"task_returned.note must be a string of at most {NOTE_MAX:,} characters"),
    ({"type": "task_raised", "exc_type": "E", "message": "m", "traceback": ["t"]},
     "task_raised.traceback must be a string, got list ['t']"),
    ({"type": "task_unsendable", "note": None}, "task_unsendable.note must be a string"),
])
def test_task_frames_are_checked_field_by_field(header: dict[str, Any], why: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(why)):
        list(FrameReader(sender="task").feed(frame_of(header)))


@pytest.mark.parametrize("raw", [b'{"type":"progress","percent":NaN}',
                                 b'{"type":"progress","percent":Infinity}',
                                 b'{"type":"progress","percent":1e999}',
                                 b'{"type":"task_returned","result_type":"x",'
                                 b'"table":[{"a":[-1e999]}]}'])
def test_nan_and_infinity_are_refused_however_spelled(raw: bytes) -> None:
    with pytest.raises(ProtocolError, match="NaN is not JSON|Infinity is not JSON|not finite"
                       "|from 0 to 100"):
        list(FrameReader(sender="task").feed(struct.pack(">II", len(raw), 0) + raw))


def test_flow_frames_are_checked_too() -> None:
    with pytest.raises(ProtocolError, match=re.escape("call_task.key must be a string, got "
                                                      "list ['a', 'b']")):
        list(FrameReader(sender="flow").feed(frame_of(
            {"type": "call_task", "key": ["a", "b"], "name": "n"})))


@pytest.mark.parametrize(("sender", "message"), [
    ("task", CallTask(key="k", name="n")), ("task", FlowFinished()),
    ("task", RunTask(key="k", name="n", index=0)),
    ("flow", Progress(percent=1)), ("flow", TaskReturned(result_type="int")),
    ("flow", StartFlow(flow_name="f", run_id="r")),
])
def test_a_role_may_send_only_its_own_frames(sender: str, message: Message) -> None:
    with pytest.raises(ProtocolError, match=f"a {sender} process may not send {message.TYPE}"):
        list(FrameReader(sender=sender).feed(encode_frame(message)))


def test_every_good_frame_of_a_role_passes() -> None:
    task_frames = [Progress(percent=99.5), TaskReturned(
        result_type="TaskResult", is_task_result=True, passed=False, note="n",
        table=[{"a": [1, {"b": None}], "c": 1.5}], peak_rss=1 << 40),
        TaskRaised(exc_type="E", message="m", traceback="t"), TaskUnsendable(note="n")]
    for message in task_frames:
        assert list(FrameReader(sender="task").feed(encode_frame(message))) == [(message, b"")]
    for message in (CallTask(key="k", name="n", args_error="e"), FlowFinished(),
                    FlowRaised(exc_type="E", message="m", traceback="t")):
        assert list(FrameReader(sender="flow").feed(encode_frame(message))) == [(message, b"")]


def test_every_field_of_every_message_has_a_check() -> None:
    for cls in Message.registry.values():
        assert set(cls.SCHEMA) == {f.name for f in dataclasses.fields(cls)}, cls


# --- turn-taking ---------------------------------------------------------------------


def test_a_task_speaks_only_between_its_run_task_and_one_final_frame() -> None:
    talk = Conversation("task")
    with pytest.raises(ProtocolError, match="progress frame before it was given its work"):
        talk.received(Progress(percent=1))
    talk = Conversation("task")
    talk.sent(RunTask(key="k", name="n", index=0))
    talk.received(Progress(percent=1))
    talk.received(TaskReturned(result_type="int"))
    with pytest.raises(ProtocolError, match="task_returned frame after its final frame"):
        talk.received(TaskReturned(result_type="int"))


def test_a_flow_waits_for_each_reply_before_it_speaks_again() -> None:
    talk = Conversation("flow")
    talk.sent(StartFlow(flow_name="f", run_id="r"))
    talk.received(CallTask(key="k", name="n"))
    with pytest.raises(ProtocolError, match="call_task frame while its task call awaits"):
        talk.received(CallTask(key="k", name="n"))
    talk = Conversation("flow")
    talk.sent(StartFlow(flow_name="f", run_id="r"))
    talk.received(CallTask(key="k", name="n"))
    talk.sent(TaskReply(action="return_none", task_name="n"))
    talk.received(FlowFinished())
    with pytest.raises(ProtocolError, match="flow_finished frame after its final frame"):
        talk.received(FlowFinished())


def test_blocking_reader_says_how_much_it_had_when_the_channel_closed() -> None:
    left, right = socket.socketpair()
    with left, right:
        send_message(left, CallTask(key="k", name="n"), b"blob")
        assert recv_message(right) == (CallTask(key="k", name="n"), b"blob")
        frame = encode_frame(CallTask(key="k", name="n"), b"blob")
        left.sendall(frame[:-2])
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(ChannelClosed, match="after 2 of 4 bytes of frame payload"):
            recv_message(right)
        with pytest.raises(ChannelClosed, match="after 0 of 8 bytes of frame prefix"):
            recv_message(right)


# --- lines --------------------------------------------------------------------------


def test_lines_split_across_chunks() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"hel") == []
    assert splitter.feed(b"lo\nwor") == ["hello"]
    assert splitter.feed(b"ld\n\nlast") == ["world", ""]
    assert splitter.finish() == ["last"]
    assert splitter.finish() == []


def test_invalid_utf8_becomes_replacement_characters() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"caf\xc3") == []
    assert splitter.feed(b"\xa9 \xff\n") == ["caf\u00e9 \ufffd"]


def test_long_lines_are_cut_and_marked() -> None:
    splitter = LineSplitter(max_line=4)
    assert splitter.feed(b"abcdefghij\nxy\n") == ["abcd" + CONTINUED, "efgh" + CONTINUED,
                                                   "ij", "xy"]
    assert splitter.split_lines == 2


def test_a_line_without_newline_cannot_grow_memory() -> None:
    splitter = LineSplitter(max_line=4)
    assert splitter.feed(b"abcdef") == ["abcd" + CONTINUED]
    assert splitter.feed(b"gh") == []
    assert splitter.feed(b"ijk") == ["efgh" + CONTINUED]
    assert splitter.feed(b"\n") == ["ijk"]


# --- deadlines (Given / When / Then) ------------------------------------------------


def test_no_deadline_is_due_before_its_time() -> None:
    # Given every deadline in the future
    deadlines = Deadlines(tick=10.0, sample=11.0, timeout=12.0, kill=13.0)
    # When we ask at an earlier time
    due = deadlines.due(9.9)
    # Then nothing is due, and the next wake is the nearest deadline
    assert due == []
    assert deadlines.next_wake(9.0) == pytest.approx(1.0)


def test_due_deadlines_come_in_a_fixed_order() -> None:
    # Given all four deadlines passed
    deadlines = Deadlines(tick=1.0, sample=2.0, timeout=3.0, kill=4.0)
    # When we ask
    due = deadlines.due(5.0)
    # Then all are named, tick first, kill last
    assert due == ["tick", "sample", "timeout", "kill"]


def test_timeout_and_kill_fire_once_and_are_remembered() -> None:
    # Given a passed timeout and a passed tick
    deadlines = Deadlines(tick=1.0, timeout=2.0)
    # When asked twice without the caller rescheduling anything
    first, second = deadlines.due(3.0), deadlines.due(4.0)
    # Then the one-shot timeout fired once and is recorded; the tick repeats until rescheduled
    assert first == ["tick", "timeout"]
    assert second == ["tick"]
    assert deadlines.timeout is None and deadlines.fired == {"timeout"}


def test_a_deadline_exactly_now_is_due() -> None:
    # Given a kill deadline at t=5
    deadlines = Deadlines(kill=5.0)
    # When the clock reads exactly 5
    due = deadlines.due(5.0)
    # Then it is due and remembered as fired
    assert due == ["kill"] and deadlines.fired == {"kill"}


def test_without_deadlines_the_loop_sleeps_until_woken() -> None:
    # Given no deadlines / When asked for the next wake / Then there is none
    assert Deadlines().next_wake(100.0) is None
    # Given a deadline in the past / Then the wait is zero, never negative
    assert Deadlines(tick=1.0).next_wake(100.0) == 0.0


# --- task order from the flow's source ---------------------------------------------


@task
def extract():
    return 1


@task
def clean(value):
    return value


@task(name="load data")
def load(value):
    return value


def not_a_task(value):
    return value


class Steps:
    extract = extract


def nested_flow():
    load(clean(extract()))


def repeated_flow():
    for _ in range(3):
        extract()
    clean(not_a_task(1))
    extract()


def attribute_and_inner_def_flow():
    def helper():
        load(1)  # a nested def is not a call of the flow body

    Steps.extract()
    print(len([clean(1)]))


def closure_flow_factory():
    local_task = load

    def flow_body():
        local_task(extract())

    return flow_body


def order(func) -> list[str]:
    return [t.name for t in tasks_in_call_order(FlowDefinition("f", func), get_registry())]


def test_nested_calls_list_innermost_first() -> None:
    assert order(nested_flow) == ["extract", "clean", "load data"]


def test_each_task_is_listed_once_and_other_calls_are_ignored() -> None:
    assert order(repeated_flow) == ["extract", "clean"]


def test_attribute_calls_resolve_and_nested_defs_do_not_count() -> None:
    assert order(attribute_and_inner_def_flow) == ["extract", "clean"]


def test_closure_variables_resolve() -> None:
    assert order(closure_flow_factory()) == ["extract", "load data"]


def test_a_flow_without_source_has_no_static_order() -> None:
    flow_body = eval("lambda: extract()")  # noqa: S307 - no source file to read
    assert order(flow_body) == []


# --- what an honest task process sends ---------------------------------------------


def test_an_honest_summary_always_passes_the_checks() -> None:
    from perfect_runner import TaskResult
    from perfect_runner.isolation.task_child import summarize

    summary = summarize(TaskResult(passed=True, note="n", table=[
        1, "x", {"nan": float("nan"), "deep": _nested(100)}, [1, 2]]))
    (got,) = list(FrameReader(sender="task").feed(encode_frame(summary)))
    rows = got[0].table
    assert rows[:2] == [{"value": 1}, {"value": "x"}] and rows[3] == {"value": [1, 2]}
    assert rows[2]["nan"] == "NaN"
