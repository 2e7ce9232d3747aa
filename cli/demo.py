"""Demo data for a newcomer's first `make up`: a small catalogue and an incident queue,
created through the public HTTP API like any client would.

Every command carries a fixed Idempotency-Key (and every aggregate a fixed id), so
seeding twice changes nothing: the second run gets the first run's answers.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx

NAMESPACE = uuid.UUID("0e4b3c1a-5d7f-4a2e-9c61-7b8d2f3e4a50")

DATASETS: list[dict[str, Any]] = [
    {
        "name": "Surface weather observations",
        "description": "Hourly temperature, pressure and wind from 1,200 stations, quality controlled.",
        "owner": "climate",
        "tags": ["weather", "hourly", "stations"],
        "metadata": {"license": "CC-BY-4.0", "rows": 48_000_000, "format": "parquet"},
        "versions": ["1.0.0", "1.1.0", "2.0.0"],
        "checks": [("completeness", 0.997, 0.99), ("freshness_hours", 1.5, 2.0)],
    },
    {
        "name": "Daily rainfall",
        "description": "Daily rainfall totals from tipping-bucket gauges across river basins.",
        "owner": "climate",
        "tags": ["weather", "daily", "hydrology"],
        "metadata": {"license": "CC-BY-4.0", "unit": "mm"},
        "versions": ["0.9.0", "1.0.0"],
        "checks": [("completeness", 0.94, 0.98)],
    },
    {
        "name": "Customer orders",
        "description": "Every web shop order with its lines, prices and delivery status.",
        "owner": "commerce",
        "tags": ["sales", "orders"],
        "metadata": {"pii": True, "retention_days": 3650},
        "versions": ["3.2.0"],
        "checks": [("duplicates", 0.0, 0.0), ("null_customer_ratio", 0.001, 0.01)],
    },
    {
        "name": "Product catalogue",
        "description": "Products, categories and prices, refreshed nightly from the ERP.",
        "owner": "commerce",
        "tags": ["products", "nightly"],
        "metadata": {"source": "erp"},
        "versions": ["1.0.0", "1.0.1"],
        "checks": [],
    },
    {
        "name": "Legacy clickstream (2019)",
        "description": "Raw page views of the former web site; superseded by the event pipeline.",
        "owner": "web-analytics",
        "tags": ["clickstream", "legacy"],
        "metadata": {},
        "versions": ["1.0.0"],
        "checks": [],
        "archive": "superseded by the event pipeline",
    },
]

INCIDENTS: list[dict[str, Any]] = [
    {
        "title": "Nightly load of the product catalogue failed",
        "priority": "high",
        "source": "airflow",
        "assignee": "dana",
        "status": ["in_progress"],
        "comments": ["ERP export was empty; re-running."],
    },
    {
        "title": "Rainfall gauges in the north basin report zeros",
        "priority": "medium",
        "source": "monitoring",
        "assignee": "sam",
        "status": ["in_progress", "resolved"],
        "comments": ["Gauge firmware rolled back."],
    },
    {
        "title": "Orders dashboard shows yesterday's totals",
        "priority": "critical",
        "source": "support",
        "assignee": "alex",
        "status": [],
        "comments": ["Cache invalidation job stuck since 02:10."],
    },
    {
        "title": "Weather stations: duplicate readings after DST change",
        "priority": "low",
        "source": "quality",
        "assignee": None,
        "status": [],
        "comments": [],
    },
    {
        "title": "Clickstream archive bucket permissions",
        "priority": "medium",
        "source": "security",
        "assignee": "dana",
        "status": ["in_progress", "resolved", "closed"],
        "comments": ["Bucket made private."],
    },
]


def _id(*parts: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "/".join(parts)))


class Seeder:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.sent = 0

    def send(self, method: str, path: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
        for _ in range(30):  # 503 while the processor joins its group
            r = self.client.request(method, path, json=body, headers={"Idempotency-Key": _id("cmd", key)})
            if r.status_code != 503:
                break
            time.sleep(float(r.headers.get("retry-after", "1")))
        if r.status_code == 409 and r.json().get("error") == "already_exists":
            return {}
        r.raise_for_status()
        self.sent += 1
        return dict(r.json())

    def seed(self) -> int:
        for d in DATASETS:
            ident = _id("dataset", d["name"])
            base = f"/api/v1/datasets/{ident}"
            fields = {k: d[k] for k in ("name", "description", "owner", "tags", "metadata")}
            self.send("POST", "/api/v1/datasets", f"{ident}/register", {"id": ident, **fields})
            for v in d["versions"]:
                self.send(
                    "POST", f"{base}/versions", f"{ident}/v{v}", {"version": v, "notes": f"release {v}"}
                )
            for metric, value, threshold in d["checks"]:
                comparator = ">=" if metric == "completeness" else "<="
                body = {"metric": metric, "value": value, "threshold": threshold, "comparator": comparator}
                self.send("POST", f"{base}/quality-checks", f"{ident}/q/{metric}", body)
            if "archive" in d:
                self.send("POST", f"{base}/archive", f"{ident}/archive", {"reason": d["archive"]})
        for i in INCIDENTS:
            ident = _id("incident", i["title"])
            base = f"/api/v1/incidents/{ident}"
            body = {"id": ident, "title": i["title"], "priority": i["priority"], "source": i["source"]}
            self.send("POST", "/api/v1/incidents", f"{ident}/open", body)
            if i["assignee"]:
                self.send("POST", f"{base}/assign", f"{ident}/assign", {"assignee": i["assignee"]})
            for n, text in enumerate(i["comments"]):
                self.send("POST", f"{base}/comments", f"{ident}/c{n}", {"author": "ops", "body": text})
            for status in i["status"]:
                self.send("POST", f"{base}/status", f"{ident}/{status}", {"status": status})
        return self.sent


def seed(base_url: str, token: str) -> int:
    """Seed through the API as the token's principal (its tenant owns the demo data)."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, timeout=30, headers=headers) as client:
        return Seeder(client).seed()
