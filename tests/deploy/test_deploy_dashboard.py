"""The Grafana dashboard queries only metrics and labels that worker.metrics.WorkerMetrics exposes."""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

import pytest
from deploy_helpers import DASHBOARD
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from worker.metrics import WorkerMetrics

# Labels that Prometheus adds to every series scraped through the ServiceMonitor.
TARGET_LABELS = {"namespace", "pod", "service", "endpoint", "container", "job", "instance"}
METRIC_NAME = re.compile(r"\bstreamrec_[a-zA-Z0-9_]+")
SELECTOR = re.compile(r"\b(streamrec_[a-zA-Z0-9_]+)\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def _exposed_series() -> dict[str, set[str]]:
    """Map each series name on /metrics to the label names it can carry."""
    metrics = WorkerMetrics(CollectorRegistry())
    labels_by_family = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            # NOTE: _labelnames is private to prometheus_client (0.26), but it is the only
            # way to read the label names of a labelled metric that has no samples yet.
            labels_by_family[value._name] = set(value._labelnames)

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "info": ("_info",), "gauge": ("",)}
    series = {}
    for family in metrics.registry.collect():
        labels = labels_by_family[family.name]
        for suffix in suffixes[family.type]:
            series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    # An Info metric's dictionary keys become labels of its _info series; worker/app.py
    # sets these three.
    series["streamrec_model_info"] |= {"version", "cell", "path"}
    return series


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [target["expr"] for panel in _panels(dashboard["panels"]) for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_metrics_exist(dashboard: dict[str, Any]) -> None:
    exposed = _exposed_series()

    used = {name for query in _queries(dashboard) for name in METRIC_NAME.findall(query)}

    assert sorted(used - set(exposed)) == []


def test_dashboard_shows_every_metric(dashboard: dict[str, Any]) -> None:
    families = {family.name for family in WorkerMetrics(CollectorRegistry()).registry.collect()}
    text = "\n".join(_queries(dashboard))

    missing = sorted(family for family in families if not re.search(rf"\b{family}(_total|_bucket|_sum|_count|_info)?\b", text))

    assert missing == []


def test_dashboard_selector_labels_exist(dashboard: dict[str, Any]) -> None:
    exposed = _exposed_series()
    unknown = []
    for query in _queries(dashboard):
        for name, matchers in SELECTOR.findall(query):
            for label in MATCHER_LABEL.findall(matchers):
                if label not in exposed.get(name, set()) | TARGET_LABELS:
                    unknown.append(f"{name}{{{label}}}")

    assert unknown == []


def test_dashboard_grouping_labels_exist(dashboard: dict[str, Any]) -> None:
    exposed = _exposed_series()
    unknown = []
    for query in _queries(dashboard):
        available = set(TARGET_LABELS)
        for name in METRIC_NAME.findall(query):
            available |= exposed.get(name, set())
        for group in GROUPING.findall(query):
            unknown.extend(f"{label} in {query}" for label in (g.strip() for g in group.split(",")) if label and label not in available)

    assert unknown == []


@pytest.mark.parametrize("histogram", ["streamrec_event_to_recommendation_seconds", "streamrec_step_seconds", "streamrec_batch_size_events"])
@pytest.mark.parametrize("quantile", ["0.5", "0.99"])
def test_dashboard_has_quantile(dashboard: dict[str, Any], histogram: str, quantile: str) -> None:
    pattern = re.compile(rf"histogram_quantile\({re.escape(quantile)}, sum by \(le\) \(rate\({histogram}_bucket\{{")

    assert any(pattern.search(query) for query in _queries(dashboard))


def test_dashboard_panels_well_formed(dashboard: dict[str, Any]) -> None:
    panels = list(_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]

    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), panel["id"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert all(target["datasource"]["uid"] == "${datasource}" for target in panel["targets"]), panel["title"]


def test_dashboard_filters_by_namespace_and_pod(dashboard: dict[str, Any]) -> None:
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    panel_queries = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]

    assert {"datasource", "namespace", "pod"} <= variables
    assert all('namespace="$namespace", pod=~"$pod"' in query for query in panel_queries)
