"""The PromQL that deploy/ ships (alert rules, Grafana dashboard), parsed into what each query
needs from a scrape: metric names, label names, and label values it matches exactly.

Shared by tests/unit/test_deploy.py (files parse, names are declared) and
tests/e2e/test_observability.py (every name is in a live scrape of the running processes).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sumstream.json"
COMPOSE = REPO / "docker-compose.kafka.yml"
# Series Prometheus writes itself for every target; no process exports them.
SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it comes from (for messages)."""

    where: str
    expr: str


@dataclass
class Needs:
    """What a query reads: metric names, (metric, label) pairs, (metric, label, value) matches."""

    metrics: set[str] = field(default_factory=set)
    labels: set[tuple[str, str]] = field(default_factory=set)
    equal: set[tuple[str, str, str]] = field(default_factory=set)

    def update(self, other: Needs) -> None:
        self.metrics |= other.metrics
        self.labels |= other.labels
        self.equal |= other.equal


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    """Every rule (alerting and recording) of deploy/alerts.yml."""
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    """Series the recording rules create (queries may read them; no process exports them)."""
    return {rule["record"] for rule in alert_rules() if "record" in rule}


def dashboard_panels(panels: Iterable[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel of the dashboard, rows' nested panels included."""
    if panels is None:
        panels = json.loads(DASHBOARD.read_text())["panels"]
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels") or [])


def queries() -> list[Query]:
    """Every PromQL expression in the alert rules and the dashboard."""
    out = [
        Query(f"alerts.yml {rule.get('alert') or rule.get('record')}", str(rule["expr"]))
        for rule in alert_rules()
    ]
    for panel in dashboard_panels():
        for target in panel.get("targets") or []:
            if target.get("expr"):
                out.append(Query(f"dashboard panel {panel['title']!r}", str(target["expr"])))
    return out


def _selector_name(node: promql_parser.VectorSelector) -> str | None:
    if node.name:
        return str(node.name)
    for matcher in node.matchers.matchers:
        if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal:
            return str(matcher.value)
    return None


def _selectors(expr: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(expr, visit)
    return found


def needs(text: str) -> Needs:
    """Parse ``text`` (raises on a syntax error) and list what it reads."""
    expr = promql_parser.parse(text)
    out = Needs()
    for selector in _selectors(expr):
        name = _selector_name(selector)
        if name is None:
            continue
        out.metrics.add(name)
        for matcher in selector.matchers.matchers:
            if matcher.name == "__name__":
                continue
            out.labels.add((name, matcher.name))
            if matcher.op == promql_parser.MatchOp.Equal and matcher.value:
                out.equal.add((name, matcher.name, matcher.value))

    def visit(node: Any) -> None:
        # `sum by (stage) (...)`: every series inside must have the label it groups by.
        if (
            isinstance(node, promql_parser.AggregateExpr)
            and node.modifier is not None
            and node.modifier.type == promql_parser.AggModifierType.By
        ):
            for selector in _selectors(node.expr):
                name = _selector_name(selector)
                if name is not None:
                    out.labels.update((name, label) for label in node.modifier.labels)

    promql_parser.walk(expr, visit)
    return out


def all_needs() -> Needs:
    """What deploy/ reads in all, without Prometheus' own series and recording-rule outputs."""
    out = Needs()
    for query in queries():
        out.update(needs(query.expr))
    skip = SYNTHETIC | recorded_names()
    return Needs(
        {m for m in out.metrics if m not in skip},
        {(m, label) for m, label in out.labels if m not in skip},
        {(m, label, v) for m, label, v in out.equal if m not in skip},
    )


@dataclass
class Scrape:
    """Samples of one or more /metrics texts: name -> list of (labels, value)."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, *texts: str) -> Scrape:
        scrape = cls()
        for text in texts:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    scrape.samples.setdefault(sample.name, []).append(
                        (dict(sample.labels), float(sample.value))
                    )
        return scrape

    def names(self) -> set[str]:
        return set(self.samples)

    def labels(self, name: str) -> set[str]:
        return {label for labels, _ in self.samples.get(name, []) for label in labels}

    def values(self, name: str, label: str) -> set[str]:
        return {labels[label] for labels, _ in self.samples.get(name, []) if label in labels}

    def total(self, name: str, **match: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``match``."""
        return sum(
            value
            for labels, value in self.samples.get(name, [])
            if all(labels.get(k) == v for k, v in match.items())
        )

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """Sum of ``name`` grouped by the ``keys`` labels."""
        out: dict[tuple[str, ...], float] = {}
        for labels, value in self.samples.get(name, []):
            key = tuple(labels.get(k, "") for k in keys)
            out[key] = out.get(key, 0.0) + value
        return out


# Labels Prometheus attaches to every series of a target at scrape time (deploy/prometheus.yml),
# so no process exports them itself.
TARGET_LABELS = frozenset({"instance", "job"})


def missing(need: Needs, scrape: Scrape) -> list[str]:
    """What ``need`` reads that ``scrape`` lacks, as readable lines (empty: nothing)."""
    out = [f"metric {m}" for m in sorted(need.metrics - scrape.names())]
    for metric, label in sorted(need.labels):
        if label in TARGET_LABELS:
            continue
        if metric in scrape.samples and label not in scrape.labels(metric):
            out.append(f"label {label} on {metric} (has {sorted(scrape.labels(metric))})")
    for metric, label, value in sorted(need.equal):
        if metric in scrape.samples and value not in scrape.values(metric, label):
            out.append(
                f"{metric}{{{label}={value!r}}} (has {sorted(scrape.values(metric, label))})"
            )
    return out
