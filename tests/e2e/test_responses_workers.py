"""``gateway serve --workers 2`` and the Responses API: whichever front door a follow-up reaches, it finds the rank
that stores the conversation through the scheduler service (docs/responses.md, several front doors)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from gateway.sim.cluster import SimulatedEngine, free_port, simulated_engines
from tests.helpers import gateway_serve_process

MODEL = "m"
ENGINE = SimulatedEngine("e", "sglang", 4, MODEL)
CONVERSATIONS = 6
TURNS = 3


async def test_follow_ups_find_their_rank_through_either_front_door(tmp_path: Path) -> None:
    port = free_port()
    async with simulated_engines([ENGINE], speed=20.0) as [engine]:
        config = {
            "policy": "sbs",
            "port": port,
            "scheduler_service": {"url": "unix:/replaced-by-the-supervisor", "deadline_s": 2.0},
            "engines": [{"name": "e", "flavor": "sglang", "url": engine.url, "dp_size": 4, "models": [MODEL]}],
        }
        no_keepalive = httpx.Limits(max_keepalive_connections=0)  # every call a new connection: either front door
        async with (
            gateway_serve_process(tmp_path, config, "--workers", "2", ready_timeout_s=60) as (url, _),
            httpx.AsyncClient(base_url=url, timeout=30, limits=no_keepalive) as http,
        ):

            async def conversation(i: int) -> list[int]:
                body = {"model": MODEL, "input": f"conversation {i}", "max_output_tokens": 2}
                statuses, previous = [], None
                for turn in range(TURNS):
                    answer = await http.post("/v1/responses", json={**body, "previous_response_id": previous})
                    statuses.append(answer.status_code)
                    previous = answer.json().get("id")
                    statuses.append((await http.get(f"/v1/responses/{previous}")).status_code)
                    body["input"] = f"turn {turn}"
                return statuses

            results = await asyncio.gather(*(conversation(i) for i in range(CONVERSATIONS)))
            assert results == [[200] * (2 * TURNS)] * CONVERSATIONS
            seen = (await http.get(engine.url + "/_sim/requests")).json()["responses"]
            assert sum(seen["created"]) == CONVERSATIONS and seen["not_found"] == 0
            # every follow-up on the rank of the conversation it continues: TURNS - 1 of them per conversation
            assert [f for f in seen["followups"]] == [c * (TURNS - 1) for c in seen["created"]]
