"""``gateway serve`` as an operator runs it: JSON log lines on stderr (uvicorn's own included), an access line per
request, API keys from a file, and nothing secret in the output."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from click.testing import CliRunner

from gateway.cli import main
from gateway.sim.cluster import free_port, wait_ready

KEY = "sk-serve-test-5150"


def test_serve_writes_json_logs_and_checks_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# the test's key\n{KEY}\n", encoding="utf-8")
    port = free_port()
    command = [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--log-format", "json"]
    proc = subprocess.Popen(
        [*command, "--api-keys-file", str(keys)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        # embedded engines start first
        asyncio.run(wait_ready(url + "/health", timeout_s=30, is_alive=lambda: proc.poll() is None))
        with httpx.Client(base_url=url, timeout=30) as client:
            chat = {"model": "deepseek-v3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            denied = client.post("/v1/chat/completions", json=chat, headers={"X-Request-Id": "cli-denied"})
            assert denied.status_code == 401, denied.text
            r = client.post(
                "/v1/chat/completions",
                json=chat,
                headers={"Authorization": f"Bearer {KEY}", "X-Request-Id": "cli-ok"},
            )
            assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    assert KEY not in stderr
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]  # every line is JSON
    loggers = {r["logger"] for r in records}
    assert {"gateway.cli", "uvicorn.error", "gateway.access"} <= loggers, stderr
    assert all(set(r) >= {"timestamp", "level", "logger", "message"} and "color_message" not in r for r in records)
    access = {r["request_id"]: r for r in records if r["logger"] == "gateway.access"}
    assert access["cli-denied"]["status"] == 401
    assert access["cli-ok"]["status"] == 200 and access["cli-ok"]["window_id"] >= 1
    assert "uvicorn.access" not in loggers  # replaced by gateway.access


def test_serve_reports_a_missing_key_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--api-keys-file", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "nope" in result.output, result.output
