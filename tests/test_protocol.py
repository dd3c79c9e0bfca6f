"""Pure parts of the isolation layer, no child process: the frame reader, the
line splitter, the supervisor's deadline step and the AST task order."""

from __future__ import annotations

import socket
import struct

import pytest

from perfect_runner import task
from perfect_runner.isolation.lines import CONTINUED, LineSplitter
from perfect_runner.isolation.loader import tasks_in_call_order
from perfect_runner.isolation.protocol import (
    MAX_HEADER,
    CallTask,
    ChannelClosed,
    FlowFinished,
    FrameReader,
    Progress,
    ProtocolError,
    RunTask,
    TaskReturned,
    encode_frame,
    recv_message,
    send_message,
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


@pytest.mark.parametrize("header", [b"not json", b'{"type": "no_such_type"}', b"[1]",
                                    b'{"type": "progress"}'])
def test_malformed_headers_are_protocol_errors(header: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed frame header"):
        list(FrameReader().feed(struct.pack(">II", len(header), 0) + header))


def test_unknown_header_fields_are_ignored() -> None:
    header = b'{"type": "progress", "percent": 3, "added_later": true}'
    (got,) = list(FrameReader().feed(struct.pack(">II", len(header), 0) + header))
    assert got == (Progress(percent=3), b"")


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
