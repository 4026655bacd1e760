"""``gateway mock-engine --profile as-shipped`` takes the engines' own flags and serves with them."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.sim.cluster import free_port, wait_ready


@contextlib.asynccontextmanager
async def mock_engine_process(*args: str) -> AsyncIterator[str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "mock-engine",
        "--port",
        str(port),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(f"{url}/health", is_alive=lambda: process.returncode is None)
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def test_sglang_as_shipped_flags_set_the_per_rank_budget_and_cap() -> None:
    flags = ["--flavor", "sglang", "--dp-size", "8", "--profile", "as-shipped"]
    flags += ["--chunked-prefill-size", "16384", "--max-running-requests", "4096", "--enable-mixed-chunk"]
    async with mock_engine_process(*flags) as url, httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        info = (await client.get("/server_info")).json()
        assert (info["chunked_prefill_size"], info["max_running_requests"]) == (2048, 512)
        body = {"model": "deepseek-v3", "prompt": "hello", "max_tokens": 3, "ignore_eos": True}
        answer = await client.post("/v1/completions", json=body)
        assert answer.status_code == 200
        assert answer.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("flags", "top_level", "per_rank"),
    [
        ([], None, 2048),  # flag unset: SGLang's ServerArgs field stays null; each rank's cap from its KV size
        (["--max-running-requests", "1024"], 1024, 256),  # the flag as given, a whole-engine figure over 4 ranks
    ],
)
async def test_server_info_can_report_max_running_requests_as_sglang_does(
    flags: list[str], top_level: int | None, per_rank: int
) -> None:
    base = ["--flavor", "sglang", "--dp-size", "4", "--profile", "as-shipped"]
    async with (
        mock_engine_process(*base, *flags, "--server-info-max-running", "sglang") as url,
        httpx.AsyncClient(base_url=url, timeout=10.0) as client,
    ):
        info = (await client.get("/server_info")).json()
    assert info["max_running_requests"] == top_level
    assert [s["effective_max_running_requests_per_dp"] for s in info["internal_states"]] == [per_rank] * 4


async def test_server_info_reports_one_ranks_cap_by_default() -> None:
    async with (
        mock_engine_process("--flavor", "sglang", "--dp-size", "4", "--profile", "as-shipped") as url,
        httpx.AsyncClient(base_url=url, timeout=10.0) as client,
    ):
        info = (await client.get("/server_info")).json()
    assert info["max_running_requests"] == 2048
    assert all("effective_max_running_requests_per_dp" not in s for s in info["internal_states"])


async def test_vllm_as_shipped_serves_with_its_flags() -> None:
    flags = ["--flavor", "vllm", "--dp-size", "2", "--profile", "as-shipped", "--max-num-batched-tokens", "512"]
    flags += ["--max-num-seqs", "64", "--no-async-scheduling", "--prefill-rate", "4000", "--speed", "50"]
    async with mock_engine_process(*flags) as url, httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        body = {"model": "deepseek-v3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        answer = await client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200


@pytest.mark.parametrize(
    "args",
    [
        ["--flavor", "sglang", "--chunked-prefill-size", "4096"],  # engine flags need --profile as-shipped
        ["--flavor", "sglang", "--profile", "as-shipped", "--max-num-seqs", "64"],  # a vLLM flag on SGLang
        ["--flavor", "vllm", "--profile", "as-shipped", "--enable-mixed-chunk"],  # a SGLang flag on vLLM
    ],
)
def test_engine_flags_that_cannot_apply_are_refused(args: list[str]) -> None:
    result = CliRunner().invoke(main, ["mock-engine", "--port", "0", *args])
    assert result.exit_code == 2
    assert "--profile as-shipped" in result.output or "flags" in result.output
