"""deploy/prometheus: the scrape configuration and rules pass promtool, and every alert has a unit test."""

from __future__ import annotations

import yaml

from tests.deploy.tools import DEPLOY, run_tool

PROMETHEUS = DEPLOY / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))


def test_scrape_configuration_is_valid() -> None:
    out = run_tool("promtool", "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in out.stdout + out.stderr


def test_rules_are_valid() -> None:
    run_tool("promtool", "check", "rules", *(str(p) for p in RULE_FILES))


def test_alert_unit_tests_pass() -> None:
    out = run_tool("promtool", "test", "rules", str(PROMETHEUS / "tests" / "alerts_test.yml"), cwd=PROMETHEUS)
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_alert_is_seen_firing_by_a_unit_test() -> None:
    alerts = {
        rule["alert"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    required = {"GatewayEngineDown", "GatewayTTFTOverSLO", "GatewayWindowSaturated", "GatewayRankImbalance"}
    assert required <= alerts, f"alerts missing: {sorted(required - alerts)}"
    assert any("Scrape" in a for a in alerts), alerts
    tests = yaml.safe_load((PROMETHEUS / "tests" / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    silent = {
        case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if not case.get("exp_alerts")
    }
    assert alerts <= fired, f"alerts no unit test sees firing: {sorted(alerts - fired)}"
    assert alerts <= silent, f"alerts no unit test sees silent: {sorted(alerts - silent)}"
