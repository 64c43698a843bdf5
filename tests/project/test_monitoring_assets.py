"""The example Prometheus rules and Grafana dashboard only use metrics a dispatcher exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edm_sched.metrics import DispatcherMetrics

ASSETS = Path(__file__).resolve().parents[2] / "docs" / "monitoring"


def exported() -> set[str]:
    names: set[str] = set()
    for metric in DispatcherMetrics().registry.collect():
        names.update(s.name for s in metric.samples)
        names.add(metric.name)
        if metric.type == "counter":
            names.add(f"{metric.name}_total")
    names.update(f"{n}_bucket" for n in list(names))
    return names


def referenced(text: str) -> set[str]:
    return set(re.findall(r"\bedm_[a-z_]+", text))


def test_dashboard_metrics_exist() -> None:
    dash = json.loads((ASSETS / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    assert referenced(exprs) <= exported()


def test_alert_rules_metrics_exist() -> None:
    text = (ASSETS / "prometheus-alerts.yml").read_text()
    assert referenced(text) <= exported()
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load(text)["groups"][0]["rules"]
    assert all({"alert", "expr"} <= set(r) for r in rules)
