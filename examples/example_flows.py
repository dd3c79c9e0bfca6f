"""Perfect's four example flows, ported to perfect_runner.

Run them locally with ``python -m perfect_runner --flows example_flows`` (or
let the Perfect UI trigger them). Each task prints what it is doing, simulates
work with a short sleep and returns a `TaskResult` whose note and table show up
in the UI and in the local HTML report.

The sleeps are the estimated times scaled down by ``PERFECT_EXAMPLE_TIME_SCALE``
(default 0.04) so that all four flows together finish in a few seconds; set it
to 1 to watch the progress bars move at Perfect's estimated pace.

Importing this module has no side effects: the runner imports it in a fork
server and in registration children.
"""

from __future__ import annotations

import os
import time

from perfect_runner import TaskResult, flow, report_progress, task

_TIME_SCALE = float(os.environ.get("PERFECT_EXAMPLE_TIME_SCALE", "0.04"))


def _work(estimated_ms: int) -> None:
    """Simulate a share of the task's estimated time."""
    time.sleep(estimated_ms / 1000 * _TIME_SCALE)


def _metric(result: TaskResult, name: str) -> int:
    """Read a number a previous task reported in its metric/value table."""
    for row in result.table:
        if row.get("metric") == name:
            return int(row["value"])
    raise ValueError(f"previous task reported no {name!r} metric")


# --- 1. Daily Sales ETL ------------------------------------------------------


@task(estimated_time=3000)
def fetch_db_connection(attempt: int, previous: TaskResult | None = None) -> TaskResult:
    """Connect to postgres_prod

    Called twice by the flow; the second call reuses the pooled connection.
    """
    print(f"Connecting to postgres_prod (attempt {attempt})...")
    _work(3000)
    reused = previous is not None and previous.passed
    latency = 4 if reused else 12
    note = "Reused pooled connection" if reused else "Connected to postgres_prod"
    return TaskResult(
        passed=True,
        note=note,
        table=[{"connection": "postgres_prod", "latency_ms": latency, "status": "connected"}],
    )


@task(estimated_time=8000)
def extract_sales_data(connection: TaskResult) -> TaskResult:
    """Query raw logs

    Reads yesterday's rows from sales_raw over the connection fetched before.
    """
    print("Extracting sales data...")
    _work(8000)
    if not connection.passed:
        return TaskResult(passed=False, note="No database connection")
    return TaskResult(
        passed=True,
        note="Extracted 1000 rows from sales_raw",
        table=[
            {"metric": "rows", "value": 1000},
            {"metric": "source_table", "value": "sales_raw"},
            {"metric": "query_time_ms", "value": 842},
            {"metric": "bytes_read", "value": 2_457_600},
        ],
    )


@task(estimated_time=6000)
def clean_dataframe(raw: TaskResult) -> TaskResult:
    """Remove nulls

    Drops rows with nulls in required fields.
    """
    print("Cleaning dataframe...")
    _work(6000)
    rows = _metric(raw, "rows")
    # field -> (nulls found, rows removed); a row with several nulls is removed once
    nulls = {"customer_id": (22, 20), "amount": (18, 18), "region": (15, 12)}
    removed = sum(dropped for _, dropped in nulls.values())
    return TaskResult(
        passed=True,
        note=f"Removed {removed} rows with nulls ({rows} -> {rows - removed})",
        table=[
            {"field": field, "nulls_found": found, "nulls_removed": dropped}
            for field, (found, dropped) in nulls.items()
        ],
    )


@task(estimated_time=5000)
def load_to_warehouse(raw: TaskResult, cleaned: TaskResult) -> TaskResult:
    """Insert into sales_daily

    Loads the cleaned rows into BigQuery.
    """
    print("Loading to warehouse...")
    _work(5000)
    removed = sum(int(row["nulls_removed"]) for row in cleaned.table)
    loaded = _metric(raw, "rows") - removed
    return TaskResult(
        passed=True,
        note=f"Loaded {loaded} rows into sales_daily",
        table=[
            {"operation": "insert", "rows": loaded, "time_ms": 1320},
            {"operation": "dedupe", "rows": 0, "time_ms": 210},
            {"operation": "commit", "rows": loaded, "time_ms": 95},
        ],
    )


@flow(
    "Daily Sales ETL",
    description="Extracts sales data from SQL, transforms via Pandas, and loads to BigQuery.",
    tags={"version": "v2.1", "team": "data-eng", "priority": "high"},
)
def daily_sales_etl() -> None:
    connection = None
    for attempt in range(1, 3):
        connection = fetch_db_connection(attempt, connection)
    raw = extract_sales_data(connection)
    cleaned = clean_dataframe(raw)
    load_to_warehouse(raw, cleaned)


# --- 2. Churn Model Retraining -------------------------------------------------

_AUC_THRESHOLD = 0.85


@task(estimated_time=5000)
def fetch_training_set() -> TaskResult:
    """Fetch new user data for training"""
    print("Fetching training set...")
    _work(5000)
    return TaskResult(
        passed=True,
        note="Fetched 50,000 training samples",
        table=[{"dataset": "users_2024_q2", "samples": 50_000, "features": 42}],
    )


@task(estimated_time=20000)
def train_xgboost(training_set: TaskResult) -> TaskResult:
    """Train classifier on GPU"""
    print("Training XGBoost classifier on GPU...")
    epochs = 5
    for epoch in range(1, epochs + 1):
        _work(20000 // epochs)
        print(f"epoch {epoch}/{epochs} done")
        report_progress(epoch * 100 // epochs)
    auc = 0.87
    samples = int(training_set.table[0]["samples"])
    return TaskResult(
        passed=auc > _AUC_THRESHOLD,
        note=f"AUC {auc} on {samples:,} samples (threshold {_AUC_THRESHOLD})",
        table=[
            {"metric": "AUC", "value": auc, "threshold": _AUC_THRESHOLD},
            {"metric": "Precision", "value": 0.81, "threshold": 0.75},
            {"metric": "Recall", "value": 0.78, "threshold": 0.70},
        ],
    )


@task(estimated_time=7000)
def evaluate_model(model: TaskResult) -> TaskResult:
    """Evaluate the model against the holdout set"""
    print("Evaluating model...")
    _work(7000)
    passed = model.passed
    return TaskResult(
        passed=passed,
        note="Model beats the production model" if passed else "Model below threshold",
        table=[
            {"check": "auc_threshold", "passed": passed, "details": model.note},
            {"check": "no_data_leakage", "passed": True, "details": "train/holdout disjoint"},
            {"check": "calibration", "passed": True, "details": "Brier score 0.11"},
        ],
    )


@task(estimated_time=10000)
def deploy_if_better(evaluation: TaskResult) -> TaskResult:
    """Deploy the model if it beat the current one"""
    print("Deploying model...")
    _work(10000)
    if not evaluation.passed:
        return TaskResult(passed=False, note="Evaluation failed: deployment skipped")
    return TaskResult(
        passed=True,
        note="Deployed churn-xgb v1.0 to production",
        table=[{"endpoint": "churn-predict", "version": "v1.0", "replicas": 3}],
    )


@flow(
    "Churn Model Retraining",
    description="Retrains the churn prediction model on new user data.",
    tags={"version": "v1.0", "team": "ml-ops", "model": "xgboost"},
)
def churn_model_retraining() -> None:
    training_set = fetch_training_set()
    model = train_xgboost(training_set)
    evaluation = evaluate_model(model)
    deploy_if_better(evaluation)


# --- 3. Infrastructure Health Check -------------------------------------------


@task(estimated_time=3000)
def check_api_latency() -> TaskResult:
    """Measure p95 latency of the public API"""
    print("Checking API latency...")
    _work(3000)
    return TaskResult(
        passed=True,
        note="p95 latency 182 ms",
        table=[
            {"endpoint": "/api/orders", "p95_ms": 182, "status": "ok"},
            {"endpoint": "/api/users", "p95_ms": 95, "status": "ok"},
            {"endpoint": "/api/search", "p95_ms": 240, "status": "ok"},
        ],
    )


@task(estimated_time=3000)
def check_db_pool() -> TaskResult:
    """Check database connection pool usage"""
    print("Checking database connection pool...")
    _work(3000)
    return TaskResult(
        passed=True,
        note="Pool at 45% capacity",
        table=[{"pool": "postgres_prod", "active": 18, "max": 40, "usage": "45%"}],
    )


@task(estimated_time=3000)
def check_redis_memory() -> TaskResult:
    """Check Redis memory usage"""
    print("Checking Redis memory...")
    _work(3000)
    return TaskResult(
        passed=True,
        note="Redis at 62% of maxmemory",
        table=[{"instance": "redis-cache-1", "used_mb": 2540, "max_mb": 4096, "usage": "62%"}],
    )


@task(estimated_time=3000)
def alert_pagerduty_if_critical(*checks: TaskResult) -> TaskResult:
    """Page the on-call engineer if a check is critical"""
    print("Evaluating alerts...")
    _work(3000)
    names = ["api_latency", "db_pool", "redis_memory"]
    critical = [name for name, check in zip(names, checks, strict=True) if not check.passed]
    return TaskResult(
        passed=True,
        note=f"Paged on-call for {', '.join(critical)}" if critical else "All systems nominal",
        table=[
            {"check": name, "critical": name in critical, "paged": name in critical}
            for name in names
        ],
    )


@flow(
    "Infrastructure Health Check",
    description="Checks API latency and database connection pool status.",
)
def infrastructure_health_check() -> None:
    api = check_api_latency()
    pool = check_db_pool()
    redis = check_redis_memory()
    alert_pagerduty_if_critical(api, pool, redis)


# --- 4. Weekly Executive Report ------------------------------------------------


@task(estimated_time=8000)
def compute_kpis() -> TaskResult:
    """Compute the week's KPIs"""
    print("Computing KPIs...")
    _work(8000)
    return TaskResult(
        passed=True,
        note="Computed 3 KPIs for week 23",
        table=[
            {
                "kpi": "revenue",
                "value": 1_250_000,
                "change": "+8.2%",
                "breakdown": {"north": 480_000, "south": 390_000, "online": 380_000},
            },
            {
                "kpi": "active_users",
                "value": 84_200,
                "change": "+3.1%",
                "breakdown": {"web": 51_000, "ios": 21_400, "android": 11_800},
            },
            {
                "kpi": "churn_rate",
                "value": "2.4%",
                "change": "-0.3pp",
                "breakdown": {"monthly_plans": "3.1%", "annual_plans": "0.9%"},
            },
        ],
    )


@task(estimated_time=5000)
def generate_charts(kpis: TaskResult) -> TaskResult:
    """Render one chart per KPI"""
    print("Generating charts...")
    _work(5000)
    return TaskResult(
        passed=True,
        note=f"Generated {len(kpis.table)} charts",
        table=[{"chart": f"{row['kpi']}.png", "type": "line"} for row in kpis.table],
    )


@task(estimated_time=12000)
def render_pdf(charts: TaskResult) -> TaskResult:
    """Lay out the KPIs and charts as a PDF"""
    print("Rendering PDF...")
    _work(12000)
    pages = 2 + len(charts.table)
    return TaskResult(
        passed=True,
        note=f"Rendered weekly_report.pdf ({pages} pages)",
        table=[{"file": "weekly_report.pdf", "pages": pages, "size_kb": 1840}],
    )


@task(estimated_time=4000)
def email_report(pdf: TaskResult) -> TaskResult:
    """Email the PDF to the C-suite"""
    print("Emailing report...")
    _work(4000)
    recipients = [
        ("ceo@example.com", True),
        ("cfo@example.com", True),
        ("cto@example.com", False),
        ("coo@example.com", True),
        ("cmo@example.com", False),
    ]
    return TaskResult(
        passed=pdf.passed,
        note=f"Sent to {len(recipients)} recipients",
        table=[
            {"recipient": address, "status": "delivered", "opened": opened}
            for address, opened in recipients
        ],
    )


@flow(
    "Weekly Executive Report",
    description="Generates PDF report and emails it to the C-suite.",
)
def weekly_executive_report() -> None:
    kpis = compute_kpis()
    charts = generate_charts(kpis)
    pdf = render_pdf(charts)
    email_report(pdf)
