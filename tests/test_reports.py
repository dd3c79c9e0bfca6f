"""The HTML report, its timeline picture, reports/index.html and the terminal's
counts, from real local runs: the CLI as a subprocess (or the executor with a
live terminal view), the pages parsed with html.parser as a browser would."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import run_cli
from test_interrupt import start, wait_until_crunch_runs

from perfect_runner.executor.records import AttemptSpan, RunRecord, TaskRecord
from perfect_runner.jsonsafe import json_safe
from perfect_runner.local import report_svg
from perfect_runner.local.report_html import render_html
from perfect_runner.local.terminal_view import TerminalView

FLOWS = """
@task
def extract():
    for i in range(30):
        print(f"extract line {i}")
    print("slow disk", file=sys.stderr)
    return TaskResult(passed=True, note="30 rows", table=[{"rows": 30}])


@task(retries=1, retry_delay=0.2)
def flaky():
    print("flaky starts")
    marker = TMP / "flaky-ran"
    if not marker.exists():
        marker.write_text("1")
        raise RuntimeError("first attempt fails")
    return TaskResult(passed=True, note="second attempt passed")


@task(crucial_pass=False)
def optional_check():
    return TaskResult(passed=False, note="optional check failed")


@task
def validate():
    raise ValueError("schema mismatch in column amount")


@task
def publish():
    return TaskResult(passed=True, note="published")


@flow("Report Flow")
def report_flow():
    extract()
    flaky()
    optional_check()
    validate()
    publish()


@flow("Quick Flow")
def quick_flow():
    publish()
"""

# Markup, an attribute breakout, a CDATA/SVG end. Names cannot hold control characters
# (the runner refuses them), so the terminal escape and the bidi override go into the
# output, the note and the table only.
HOSTILE = '<img src=x onerror=alert(1)>"\'&amp;]]></svg></pre>'
CONTROLS = "\x1b[31m\u202e"

HOSTILE_FLOWS = f"""
NAME = {HOSTILE!r}
NASTY = NAME + {CONTROLS!r}


@task(name="task " + NAME)
def hostile_task():
    print("out " + NASTY)
    print("<script>alert(2)</script>", file=sys.stderr)
    return TaskResult(passed=False, note="note " + NASTY, table=[{{NASTY: NASTY}}])


@task(name="never " + NAME)
def never():
    pass


@flow("Hostile " + NAME)
def hostile_flow():
    hostile_task()
    never()
"""

LOOP_FLOWS = """
@task
def step(i):
    return TaskResult(passed=True, note=f"step {i}")


@task
def final():
    return TaskResult(passed=True)


@flow("Loop Flow")
def loop_flow():
    for i in range(3):
        step(i)
    final()
"""


# --- a page as a browser sees it --------------------------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: str = ""

    def all_text(self) -> str:
        return self.text + "".join(child.all_text() for child in self.children)

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def find(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [n for n in self.walk() if (tag is None or n.tag == tag)
                and (cls is None or cls in n.attrs.get("class", "").split())]


VOID = {"meta", "br", "img", "input", "link", "hr", "col", "wbr"}


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(Node("#text", {}, text=data))


def parse(path: Path) -> Node:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.root


def check_links(page: Node, where: Path) -> None:
    """Every #anchor names an element id; every relative link names an existing file."""
    ids = [n.attrs["id"] for n in page.walk() if "id" in n.attrs]
    assert len(ids) == len(set(ids)), "duplicate ids"
    hrefs = [n.attrs["href"] for n in page.find("a")]
    assert hrefs
    for href in hrefs:
        assert not href.lower().startswith(("javascript:", "http:", "https:", "//")), href
        if href.startswith("#"):
            assert href[1:] in ids, f"anchor {href} resolves to nothing"
        else:
            assert (where / href).is_file(), f"link {href} resolves to no file"


def svg_of(path: Path) -> ET.Element:
    """The inline timeline, which must also be well-formed XML on its own."""
    page = path.read_text(encoding="utf-8")
    (svg,) = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    return ET.fromstring(svg)


def counts(page: Node) -> dict[str, int]:
    cards = [card.all_text() for card in page.find("div", "count")]
    return {re.sub(r"^\d+", "", c): int(re.match(r"\d+", c).group()) for c in cards}


def cli(tmp_path: Path, *args: str):
    return run_cli(*args, "--reports-dir", str(tmp_path / "reports"),
                   "--log-dir", str(tmp_path / "logs"), cwd=tmp_path)


@pytest.fixture
def flows_file(write_flows) -> Path:
    return write_flows(FLOWS, name="report_flows")


def report_of(tmp_path: Path, stem: str) -> Path:
    (html,) = (tmp_path / "reports").glob(f"{stem}_*.html")
    return html


# --- the run's report -----------------------------------------------------------------


def test_report_counts_failed_first_not_run_and_anchors(flows_file: Path, tmp_path: Path) -> None:
    result = cli(tmp_path, "--flows", str(flows_file), "--run", "Report Flow")
    assert result.code == 1, result.stdout + result.stderr
    html = report_of(tmp_path, "Report_Flow")
    page = parse(html)

    assert counts(page) == {"passed": 2, "failed": 2, "not run": 1}
    # The failed tasks are listed near the top, each one click from its section.
    (failed_box,) = page.find("div", "failed-list")
    links = {a.all_text(): a.attrs["href"] for a in failed_box.find("a")}
    assert links == {"#2 optional_check": "#task-2", "#3 validate": "#task-3"}
    assert "(non-crucial)" in failed_box.all_text()
    # The run-level reason of the failed run.
    (reason,) = page.find("div", "reason")
    assert "validate" in reason.all_text() and "schema mismatch" in reason.all_text()
    # A section per task call, and one per declared task that never ran.
    sections = {s.attrs["id"]: s.all_text() for s in page.find("section", "task")}
    assert list(sections) == ["task-0", "task-1", "task-2", "task-3", "not-run-0"]
    assert "publish" in sections["not-run-0"] and "NOT RUN" in sections["not-run-0"]
    assert "never ran" in sections["not-run-0"]
    extract = sections["task-0"]
    assert "30 rows" in extract and "MiB" in extract and "Duration" in extract
    # The last lines of output: the tail, not the head; stderr marked.
    assert "extract line 29" in extract and "slow disk" in extract
    assert "extract line 0\n" not in extract
    (err,) = [n for n in page.find("span", "err")]
    assert err.all_text() == "slow disk"
    flaky = sections["task-1"]
    assert "attempt 1" in flaky and "attempt 2" in flaky and "first attempt fails" in flaky
    # The output tail marks where the retry's lines start.
    assert "flaky starts\n--- attempt 2 ---\nflaky starts" in flaky
    assert "ValueError: schema mismatch in column amount" in sections["task-3"]
    # Every anchor resolves; the record, the index and the log file are relative links.
    check_links(page, html.parent)
    hrefs = {a.all_text(): a.attrs["href"] for a in page.find("a")}
    assert hrefs["index.html"] == "index.html"
    log_href = next(a.attrs["href"] for a in page.find("a") if a.attrs["href"].endswith(".log"))
    assert log_href.startswith("../logs/") and not os.path.isabs(log_href)
    assert "extract line 29" in (html.parent / log_href).read_text(encoding="utf-8")


def test_timeline_has_a_bar_per_attempt_and_memory(flows_file: Path, tmp_path: Path) -> None:
    result = cli(tmp_path, "--flows", str(flows_file), "--run", "Report Flow")
    assert result.code == 1, result.stdout + result.stderr
    svg = svg_of(report_of(tmp_path, "Report_Flow"))
    ns = "{http://www.w3.org/2000/svg}"

    bars = [r for r in svg.iter(f"{ns}rect") if r.get("class") == "attempt"]
    tips = [r.find(f"{ns}title").text for r in bars]
    # extract, flaky twice (the retry is visible), optional_check, validate; publish never ran.
    assert [tip.split(",")[0] for tip in tips] == [
        "extract", "flaky", "flaky", "optional_check", "validate"]
    assert tips[1].startswith("flaky, attempt 1: failed, retried")
    assert tips[2].startswith("flaky, attempt 2: completed")
    fills = [r.get("fill") for r in bars]
    assert fills[0] == fills[2] != fills[1]  # passed vs failed-and-retried
    assert fills[3] == fills[4] != fills[0]  # failed
    # The second attempt starts after the first ended (the retry delay shows as a gap).
    first, second = bars[1], bars[2]
    assert float(second.get("x")) > float(first.get("x")) + float(first.get("width"))
    texts = ["".join(t.itertext()) for t in svg.iter(f"{ns}text")]
    assert "not run" in texts and "#4 publish" not in texts and "publish" in texts
    assert sum(t.endswith("MiB") for t in texts) == 4  # peak memory of each task call
    labels = [a.get("href") for a in svg.iter(f"{ns}a")]
    assert labels == ["#task-0", "#task-1", "#task-2", "#task-3", "#not-run-0"]


def test_hostile_names_output_and_notes_are_escaped(write_flows, tmp_path: Path) -> None:
    flows = write_flows(HOSTILE_FLOWS)
    result = cli(tmp_path, "--flows", str(flows), "--run-all")
    assert result.code == 1, result.stdout + result.stderr
    (html,) = (tmp_path / "reports").glob("Hostile_*.html")
    page = parse(html)

    tags = {n.tag for n in page.walk()}
    assert not tags & {"img", "script", "iframe", "object", "embed"}
    assert not [n for n in page.walk() if any(k.startswith("on") for k in n.attrs)]
    text = page.all_text()
    visible = HOSTILE  # the controls are stripped
    for what in ("task ", "never ", "out ", "note ", "Hostile "):
        assert what + visible in text, what
    assert "<script>alert(2)</script>" in text  # shown as text, not run
    assert "\x1b" not in html.read_text(encoding="utf-8")
    assert "\u202e" not in html.read_text(encoding="utf-8")
    # The not-run task with a hostile name is listed and linked, the SVG is well-formed.
    assert counts(page) == {"passed": 0, "failed": 1, "not run": 1}
    (not_run,) = [s for s in page.find("section", "task") if s.attrs["id"] == "not-run-0"]
    assert "never " + visible in not_run.all_text()
    check_links(page, html.parent)
    svg = svg_of(html)
    assert any(visible in "".join(t.itertext()) for t in svg.iter())
    index = parse(html.parent / "index.html")
    assert not {n.tag for n in index.walk()} & {"img", "script"}
    assert "Hostile " + visible in index.all_text()
    check_links(index, html.parent)


# --- the index --------------------------------------------------------------------------


def test_index_lists_every_run_newest_first_and_skips_foreign_json(
        flows_file: Path, tmp_path: Path) -> None:
    first = cli(tmp_path, "--flows", str(flows_file), "--run-all")
    assert first.code == 1, first.stdout + first.stderr
    reports = tmp_path / "reports"
    assert "All runs: " in first.stdout and "(2 runs)" in first.stdout
    (reports / "corrupt.json").write_text('{"run_id": "x", "tasks": [', encoding="utf-8")
    (reports / "foreign.json").write_text("[1, 2, 3]", encoding="utf-8")
    (reports / "other.json").write_text('{"name": "package.json"}', encoding="utf-8")
    second = cli(tmp_path, "--flows", str(flows_file), "--run", "Quick Flow")
    assert second.code == 0, second.stdout + second.stderr
    assert "(3 runs)" in second.stdout
    assert "3 JSON files" in second.stdout and "corrupt.json" in second.stdout

    index = reports / "index.html"
    page = parse(index)
    (table,) = page.find("table")
    rows = table.find("tr")[1:]
    flows = [row.find("td")[1].find("a")[0].all_text() for row in rows]
    records = [json.loads(p.read_text()) for p in reports.glob("*_local-*.json")]
    by_start = sorted(records, key=lambda r: r["started_at"], reverse=True)
    assert flows == [r["flow_name"] for r in by_start]
    assert flows[0] == "Quick Flow" and sorted(flows[1:]) == ["Quick Flow", "Report Flow"]
    report_row = rows[flows.index("Report Flow")].all_text()
    assert "FAILED" in report_row and "validate" in report_row  # the run's reason
    cells = [td.all_text() for td in rows[flows.index("Report Flow")].find("td")]
    assert cells[3:6] == ["2", "2", "1"]  # passed, failed, not run
    skipped = page.all_text()
    for name in ("corrupt.json", "foreign.json", "other.json"):
        assert name in skipped
    assert "not valid JSON" in skipped and "not a run record" in skipped
    check_links(page, reports)


def test_an_index_that_cannot_be_written_costs_no_run(flows_file: Path, tmp_path: Path) -> None:
    (tmp_path / "reports" / "index.html").mkdir(parents=True)  # in the way of the rename
    result = cli(tmp_path, "--flows", str(flows_file), "--run", "Quick Flow")
    assert result.code == 0, result.stdout + result.stderr
    assert "Quick Flow: COMPLETED" in result.stdout
    assert "All runs: index NOT written (IsADirectoryError" in result.stdout
    assert report_of(tmp_path, "Quick_Flow").is_file()
    assert not [p for p in (tmp_path / "reports").iterdir() if p.name.endswith(".tmp")]


# --- the terminal -------------------------------------------------------------------------


def test_header_counts_calls_of_a_looping_flow_and_summary_counts(
        write_flows, run_flow) -> None:
    flows = write_flows(LOOP_FLOWS)
    out = io.StringIO()
    ran = run_flow(flows, "Loop Flow", listener=TerminalView(out, live=True, width=200))
    assert ran.record.state == "COMPLETED" and len(ran.record.tasks) == 4

    headers = [(int(done), int(total))
               for done, total in re.findall(r"(\d+)/(\d+) tasks", out.getvalue())]
    assert headers, out.getvalue()
    # From the start it counts the declared tasks (step, final), not only the calls made
    # so far; a loop's extra calls raise the total, which never falls below what is done.
    assert headers[0] == (0, 2)
    assert all(done <= total for done, total in headers)
    totals = [total for _, total in headers]
    assert totals == sorted(totals) and totals[-1] == 4
    assert "    4 task calls: 4 passed, 0 failed, 0 not run" in out.getvalue()


def test_summary_counts_not_run_tasks_after_a_crucial_failure(flows_file: Path,
                                                               tmp_path: Path) -> None:
    result = cli(tmp_path, "--flows", str(flows_file), "--run", "Report Flow")
    assert result.code == 1
    assert "    4 task calls: 2 passed, 2 failed, 1 not run (publish)" in result.stdout


# --- what the record may hold that a plain run does not produce ---------------------------


def synthetic_run(calls: int = 3) -> dict:
    start = 1_700_000_000.0
    run = RunRecord("run-1", "Synthetic", state="FAILED", started_at=start, ended_at=start + 10,
                    declared_tasks=["a", "b", "c", "later"])
    for i in range(calls):
        task = TaskRecord(i, "abc"[i % 3], state="COMPLETED", started_at=start + i,
                          ended_at=start + i + 0.5, duration_ms=500, peak_rss=1 << 20)
        task.attempt_spans = [AttemptSpan(1, start + i, start + i + 0.5, "COMPLETED")]
        run.tasks.append(task)
    return json_safe(run.to_dict())


def test_traceback_interrupted_and_not_run_records_are_rendered(tmp_path: Path) -> None:
    run = synthetic_run()
    failed, interrupted, marked = run["tasks"]
    failed.update(state="FAILED", note="ValueError: bad <input>",
                  traceback='Traceback (most recent call last):\n  File "flows.py", line 3, '
                            'in <module>\n    validate()\nValueError: bad <input>')
    # Interrupted (Ctrl-C) while its attempt ran: the attempt has no end.
    interrupted.update(state="INTERRUPTED", ended_at=None, duration_ms=None)
    interrupted["attempt_spans"][0].update(ended_at=None, state="RUNNING")
    marked.update(state="NOT RUN", attempt_spans=[], started_at=None, ended_at=None)
    html = tmp_path / "r.html"
    html.write_text(render_html(run), encoding="utf-8")
    page = parse(html)

    assert counts(page) == {"passed": 0, "failed": 1, "not run": 2, "interrupted": 1}
    (details,) = [d for d in page.find("details") if "Traceback" in d.all_text()]
    assert "open" in details.attrs
    assert 'in <module>\n    validate()\nValueError: bad <input>' in details.all_text()
    svg = svg_of(html)
    ns = "{http://www.w3.org/2000/svg}"
    bars = [r for r in svg.iter(f"{ns}rect") if r.get("class") == "attempt"]
    assert len(bars) == 2  # the NOT RUN record has no attempt
    # The interrupted attempt is drawn up to the end of the run, in its task's colour.
    x, width = float(bars[1].get("x")), float(bars[1].get("width"))
    assert x + width == pytest.approx(report_svg.CHART_X + report_svg.CHART_W, abs=1)
    assert bars[1].get("fill") != bars[0].get("fill")
    check_links(page, tmp_path)


def test_a_long_run_draws_at_most_300_rows_and_says_so(tmp_path: Path) -> None:
    html = tmp_path / "r.html"
    html.write_text(render_html(synthetic_run(320)), encoding="utf-8")
    svg = svg_of(html)
    ns = "{http://www.w3.org/2000/svg}"
    assert len(list(svg.iter(f"{ns}a"))) == 300
    page = parse(html)
    assert "... 21 more rows not drawn" in page.all_text()  # 320 calls + 1 not run
    assert len(page.find("section", "task")) == 321
    check_links(page, tmp_path)


def test_a_not_run_list_in_the_record_wins_over_the_declared_tasks(tmp_path: Path) -> None:
    run = synthetic_run()
    assert counts(parse_page(tmp_path, run))["not run"] == 1  # "later", from declared_tasks
    run["not_run"] = ["later", "<b>cleanup</b>"]  # as written by the executor
    page = parse_page(tmp_path, run)
    assert counts(page)["not run"] == 2
    assert [s.attrs["id"] for s in page.find("section", "task")][-2:] == [
        "not-run-0", "not-run-1"]
    assert "<b>cleanup</b>" in page.all_text() and not page.find("b")


def parse_page(tmp_path: Path, run: dict) -> Node:
    html = tmp_path / "r.html"
    html.write_text(render_html(run), encoding="utf-8")
    return parse(html)


@pytest.mark.timeout(60)
def test_an_interrupted_run_reports_interrupted_and_not_run_tasks(tmp_path: Path) -> None:
    proc = start(tmp_path)
    wait_until_crunch_runs(tmp_path, proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(20) == 130
    html = report_of(tmp_path, "Nightly")
    page = parse(html)

    summary = (tmp_path / "out.txt").read_text()
    assert "    2 task calls: 1 passed, 0 failed, 1 not run (publish), 1 interrupted" in summary
    assert counts(page) == {"passed": 1, "failed": 0, "not run": 1, "interrupted": 1}
    assert not page.find("div", "failed-list")  # Ctrl-C is not the task's failure
    (reason,) = page.find("div", "reason")
    assert "interrupted by Ctrl-C (SIGINT)" in reason.all_text()
    sections = {s.attrs["id"]: s.all_text() for s in page.find("section", "task")}
    assert "INTERRUPTED" in sections["task-1"] and "crunch started" in sections["task-1"]
    assert "publish" in sections["not-run-0"]
    svg = svg_of(html)
    ns = "{http://www.w3.org/2000/svg}"
    bars = [r for r in svg.iter(f"{ns}rect") if r.get("class") == "attempt"]
    assert len(bars) == 2 and bars[1].get("fill") == report_svg.color("INTERRUPTED")
    check_links(page, html.parent)
    index = parse(tmp_path / "reports" / "index.html")
    assert "Nightly" in index.all_text() and "interrupted by Ctrl-C" in index.all_text()
