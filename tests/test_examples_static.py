"""The example flows are the ones Perfect documents (read with `ast`, not imported)."""

from __future__ import annotations

import ast
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "example_flows.py"

EXPECTED = {
    "Daily Sales ETL": {"version": "v2.1", "team": "data-eng", "priority": "high"},
    "Churn Model Retraining": {"version": "v1.0", "team": "ml-ops", "model": "xgboost"},
    "Infrastructure Health Check": {},
    "Weekly Executive Report": {},
}


def flow_decorators(tree: ast.Module) -> list[ast.Call]:
    return [
        decorator
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        for decorator in node.decorator_list
        if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", "") == "flow"
    ]


def test_example_flows_have_the_documented_names_and_tags() -> None:
    tree = ast.parse(EXAMPLES.read_text(encoding="utf-8"))
    found = {}
    for call in flow_decorators(tree):
        keywords = {keyword.arg: keyword.value for keyword in call.keywords}
        tags = ast.literal_eval(keywords["tags"]) if "tags" in keywords else {}
        found[ast.literal_eval(call.args[0])] = tags
        assert ast.literal_eval(keywords["description"])
    assert found == EXPECTED
