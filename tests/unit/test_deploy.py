"""deploy/ and docker-compose.kafka.yml: the files parse, every PromQL query parses and reads only
declared metrics, the alerts and panels the operator needs are there, and compose wires it all.

The live half (every queried name is in a real scrape) is tests/e2e/test_observability.py.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

import promql_parser
import pytest
from prometheus_client import REGISTRY

import gateway.metrics
import pipeline.core.metrics
from gateway.settings import GatewaySettings
from pipeline.core.settings import SimulatorSettings, WorkerSettings
from tests.deploy_files import (
    ALERTS,
    COMPOSE,
    DASHBOARD,
    DEPLOY,
    PROMETHEUS,
    REPO,
    SYNTHETIC,
    Needs,
    alert_rules,
    all_needs,
    dashboard_panels,
    load_yaml,
    needs,
    queries,
    recorded_names,
)

SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def declared_sample_names() -> set[str]:
    """Every sample name the worker and gateway metric modules can export."""
    assert pipeline.core.metrics.CONSUMER_LAG is not None and gateway.metrics.REQUESTS is not None
    names: set[str] = set()
    for family in REGISTRY.collect():
        names |= {family.name + s for s in SAMPLE_SUFFIXES.get(family.type, ("",))}
    return names


def needs_of(predicate: Any) -> list[tuple[dict[str, Any], Needs]]:
    return [(rule, needs(str(rule["expr"]))) for rule in alert_rules() if predicate(rule)]


# --- alerts.yml -------------------------------------------------------------------------------


def test_every_rule_parses_and_is_well_formed() -> None:
    rules = alert_rules()
    assert len(rules) >= 5
    names = [rule.get("alert") or rule.get("record") for rule in rules]
    assert len(names) == len(set(names)), names
    for rule in rules:
        assert ("alert" in rule) != ("record" in rule), rule
        needs(str(rule["expr"]))  # raises on a PromQL syntax error
        if "alert" in rule:
            if "for" in rule:
                assert promql_parser.parse_duration(rule["for"]).total_seconds() > 0
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
        else:
            # Recording rule names follow level:metric:operations.
            assert rule["record"].count(":") == 2, rule["record"]


def test_alerts_cover_lag_breaker_error_ratio_ttft_p99_budget_burn_and_stale_lag_samples() -> None:
    def alerting(metric: str, **equal: str) -> list[str]:
        found = []
        for rule, need in needs_of(lambda r: "alert" in r):
            if metric in need.metrics and all(
                (metric, k, v) in need.equal for k, v in equal.items()
            ):
                found.append(str(rule["expr"]))
        return found

    assert alerting("sumstream_consumer_lag_records")
    breaker = alerting("sumstream_circuit_breaker_state")
    assert breaker and any(">= 2" in expr or "== 2" in expr for expr in breaker)
    # A ratio: failed over all finished requests.
    assert any("/" in expr for expr in alerting("sumstream_requests_completed_total"))
    ttft = alerting("sumstream_stage_duration_seconds_bucket", stage="time_to_first_token")
    assert any("histogram_quantile(0.99," in "".join(expr.split()) for expr in ttft)
    assert alerting("sumstream_cost_micro_usd_total")
    # Admission without a lag sample is blind (issue 17 item 5).
    assert alerting("sumstream_gateway_lag_sample_age_seconds")


# --- the dashboard ----------------------------------------------------------------------------


def test_dashboard_parses_and_every_panel_uses_the_provisioned_datasource() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"]
    datasource = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    uid = datasource["datasources"][0]["uid"]
    panels = list(dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        # No two panels cover the same grid cell.
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] == uid, panel["title"]
            needs(target["expr"])  # raises on a PromQL syntax error


def test_dashboard_shows_latency_tokens_cost_lag_breaker_retries_and_the_upstream_limit() -> None:
    shown = Needs()
    for query in queries():
        if query.where.startswith("dashboard"):
            shown.update(needs(query.expr))
    assert ("sumstream_stage_duration_seconds_bucket", "stage") in shown.labels
    assert "sumstream_inter_token_seconds_bucket" in shown.metrics
    assert {"sumstream_input_tokens_total", "sumstream_output_tokens_total"} <= shown.metrics
    assert ("sumstream_cost_micro_usd_total", "tier") in shown.labels
    assert ("sumstream_consumer_lag_records", "stage") in shown.labels
    assert "sumstream_circuit_breaker_state" in shown.metrics
    assert "sumstream_retries_total" in shown.metrics
    assert "sumstream_gateway_overhead_seconds_bucket" in shown.metrics
    # The upstream limiter: learned limit, share, pauses, paced calls, unforeseen 429s.
    assert {
        "sumstream_upstream_concurrency_limit",
        "sumstream_upstream_share_ratio",
        "sumstream_upstream_pauses_total",
        "sumstream_upstream_paused_seconds_total",
        "sumstream_upstream_paced_calls_total",
        "sumstream_upstream_rate_limited_total",
    } <= shown.metrics


def test_every_metric_queried_is_declared_by_a_worker_or_the_gateway() -> None:
    need = all_needs()
    assert need.metrics, "no query found"
    undeclared = sorted(need.metrics - declared_sample_names())
    assert not undeclared, f"deploy/ queries metrics nobody exports: {undeclared}"
    # Whatever the queries read that is not exported is Prometheus' own or recorded.
    every = Needs()
    for query in queries():
        every.update(needs(query.expr))
    assert every.metrics - need.metrics <= SYNTHETIC | recorded_names()


# --- prometheus.yml and compose ---------------------------------------------------------------


def _targets(config: dict[str, Any], job: str) -> list[str]:
    (scrape,) = [c for c in config["scrape_configs"] if c["job_name"] == job]
    return [t for group in scrape["static_configs"] for t in group["targets"]]


def _port(target: str) -> int:
    return int(target.rsplit(":", 1)[1])


def test_prometheus_scrapes_every_process_on_its_default_port() -> None:
    config = load_yaml(PROMETHEUS)
    gateway_port = GatewaySettings.model_fields["port"].default
    worker_port = WorkerSettings.model_fields["metrics_port"].default
    sim_port = SimulatorSettings.model_fields["port"].default
    assert [_port(t) for t in _targets(config, "gateway")] == [gateway_port]
    # `sumstream up --workers N` gives worker i the metrics port 9464 + i.
    worker_ports = [_port(t) for t in _targets(config, "worker")]
    assert worker_ports == list(range(worker_port, worker_port + len(worker_ports)))
    assert [_port(t) for t in _targets(config, "llm-sim")] == [sim_port]
    for path in config["rule_files"]:
        assert (PROMETHEUS.parent / path).is_file(), path
    assert promql_parser.parse_duration(config["global"]["scrape_interval"]).total_seconds() > 0


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> repository-relative host path of a service's bind mounts."""
    out = {}
    for volume in service["volumes"]:
        host, container, *_ = volume.split(":")
        if host.startswith("./"):
            out[container] = host.removeprefix("./")
    return out


def test_compose_runs_prometheus_with_the_rules_and_grafana_with_the_dashboard() -> None:
    services = load_yaml(COMPOSE)["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]

    mounts = _mounts(prometheus)
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = PurePosixPath(config_arg.split("=", 1)[1])
    assert (REPO / mounts[str(config_path)]).resolve() == PROMETHEUS.resolve()
    for rule_file in load_yaml(PROMETHEUS)["rule_files"]:
        mounted = mounts[str(config_path.parent / rule_file)]
        assert (REPO / mounted).resolve() == ALERTS.resolve()

    mounts = _mounts(grafana)
    provisioning = REPO / mounts["/etc/grafana/provisioning"]
    provider = load_yaml(provisioning / "dashboards" / "sumstream.yml")["providers"][0]
    dashboards_dir = provider["options"]["path"]
    assert (REPO / mounts[dashboards_dir]).resolve() == DASHBOARD.parent.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert PurePosixPath(home).parent == PurePosixPath(dashboards_dir)
    assert (DASHBOARD.parent / PurePosixPath(home).name).is_file()
    datasource = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    # The datasource reaches the prometheus service by its compose name and published port.
    assert datasource["url"] == "http://prometheus:9090"
    assert any(p.endswith(":9090") for p in prometheus["ports"])
    assert "prometheus" in grafana["depends_on"]


@pytest.mark.parametrize(
    "bad",
    ["sum(rate(x_total[5m])", "histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m]))) >"],
)
def test_a_broken_query_is_caught(bad: str) -> None:
    with pytest.raises(ValueError):
        needs(bad)


def test_needs_lists_names_grouping_labels_and_exact_matches() -> None:
    need = needs(
        'histogram_quantile(0.99, sum by (le, stage) (rate(a_bucket{stage="x", t=~"p|q"}[5m])))'
        ' > 2 and on() absent(up{job="w"})'
    )
    assert need.metrics == {"a_bucket", "up"}
    assert need.labels == {
        ("a_bucket", "le"),
        ("a_bucket", "stage"),
        ("a_bucket", "t"),
        ("up", "job"),
    }
    assert need.equal == {("a_bucket", "stage", "x"), ("up", "job", "w")}


def test_compose_kafka_is_three_replicating_nodes_of_one_quorum() -> None:
    services = load_yaml(COMPOSE)["services"]
    nodes = [services[name]["environment"] for name in ("kafka", "kafka-2", "kafka-3")]
    assert sorted(env["KAFKA_NODE_ID"] for env in nodes) == [1, 2, 3]
    assert len({env["CLUSTER_ID"] for env in nodes}) == 1
    assert all(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].count("@") == 3 for env in nodes)
    assert all(env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == 3 for env in nodes)
    assert all(env["KAFKA_MIN_INSYNC_REPLICAS"] == 2 for env in nodes)
    assert all(env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false" for env in nodes)
