"""P/D legs per engine protocol: what each leg's body and headers carry, checked field by field against the
contracts in ``gateway/pd``'s module docstrings (SGLang 0.5.23, vLLM 0.34)."""

from __future__ import annotations

import copy
import json
import random

import pytest

from gateway.pd import DecodeSide, PdProtocolError, PrefillSide, sglang_bootstrap, vllm_mooncake, vllm_nixl
from gateway.pd.sglang_bootstrap import ROOM_MAX, mint_room

CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_tokens": 64,
    "min_tokens": 4,
}


# -- SGLang bootstrap -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rank", "dp_size"), [(0, 1), (3, 8), (7, 8), (31, 32)])
def test_rooms_are_fresh_63_bit_and_aligned_to_the_prefill_rank(rank, dp_size):
    rng = random.Random(7)
    rooms = [mint_room(rng, rank, dp_size) for _ in range(200)]
    assert len(set(rooms)) == 200
    assert all(0 <= room <= ROOM_MAX and room % dp_size == rank for room in rooms)


def test_a_room_drawn_at_the_top_of_the_range_stays_in_it():
    class Top(random.Random):
        def getrandbits(self, k: int) -> int:
            return ROOM_MAX  # 2**63 - 1 = 7 (mod 8)

    assert mint_room(Top(), 0, 8) == ROOM_MAX - 7
    assert mint_room(Top(), 7, 8) == ROOM_MAX


def test_sglang_legs_carry_the_bootstrap_and_both_rank_pins_without_conflict():
    body = copy.deepcopy(CHAT) | {"data_parallel_rank": 5, "routed_dp_rank": 6, "bootstrap_room": 1}
    before = copy.deepcopy(body)
    prefill = PrefillSide("p0", rank=3, dp_size=8, host="10.0.0.5", bootstrap_port=9000)
    plan = sglang_bootstrap.attempt(body, prefill, DecodeSide("d0", rank=17), random.Random(1))
    assert body == before  # the client's body is untouched
    assert plan.concurrent
    p, d = plan.prefill.body, plan.decode().body
    for leg in (p, d):
        assert (leg["bootstrap_host"], leg["bootstrap_port"], leg["bootstrap_room"]) == ("10.0.0.5", 9000, plan.room)
        assert "data_parallel_rank" not in leg
        assert leg["messages"] == CHAT["messages"] and leg["stream"] is True and leg["max_tokens"] == 64
    assert plan.room % 8 == 3
    assert p["routed_dp_rank"] == 3 and "disagg_prefill_dp_rank" not in p
    assert d["routed_dp_rank"] == 17 and d["disagg_prefill_dp_rank"] == 3
    assert plan.prefill.headers == {} and plan.decode().headers == {}


def test_without_a_prefill_pin_the_room_alone_names_the_prefill_rank():
    """``follow_bootstrap_room``: no ``routed_dp_rank`` to prefill, no ``disagg_prefill_dp_rank`` to decode (a
    client's are dropped too); both engines take ``room % dp_size``, the rank the room is aligned to."""
    body = copy.deepcopy(CHAT) | {"routed_dp_rank": 6, "disagg_prefill_dp_rank": 1}
    prefill = PrefillSide("p0", rank=5, dp_size=8, host="10.0.0.5")
    plan = sglang_bootstrap.attempt(body, prefill, DecodeSide("d0", rank=2), random.Random(4), pin_prefill=False)
    p, d = plan.prefill.body, plan.decode().body
    assert "routed_dp_rank" not in p and "disagg_prefill_dp_rank" not in p
    assert d["routed_dp_rank"] == 2 and "disagg_prefill_dp_rank" not in d
    assert p["bootstrap_room"] == d["bootstrap_room"] == plan.room and plan.room % 8 == 5


def test_every_sglang_attempt_mints_a_new_room_and_the_default_port():
    prefill = PrefillSide("p0", rank=0, dp_size=2, host="p")
    rng = random.Random(3)
    rooms = {sglang_bootstrap.attempt(CHAT, prefill, DecodeSide("d", 0), rng).room for _ in range(20)}
    assert len(rooms) == 20
    plan = sglang_bootstrap.attempt(CHAT, prefill, DecodeSide("d", 0), rng)
    assert plan.prefill.body["bootstrap_port"] == sglang_bootstrap.DEFAULT_BOOTSTRAP_PORT


def test_a_prefill_rank_outside_its_engine_is_refused():
    with pytest.raises(ValueError, match="prefill rank 8 outside"):
        PrefillSide("p0", rank=8, dp_size=8, host="p")


# -- vLLM NIXL ---------------------------------------------------------------------------------------------


PREFILL_ANSWER = {
    "id": "cmpl-1",
    "choices": [{"index": 0, "text": "x"}],
    "kv_transfer_params": {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": "abc_dp2",
        "remote_block_ids": [4, 5, 6],
        "remote_host": "10.0.0.5",
        "remote_port": 5602,
        "remote_request_id": "r-1",
        "tp_size": 1,
    },
}


def test_nixl_prefill_leg_asks_for_one_unstreamed_token_for_remote_decode():
    body = copy.deepcopy(CHAT) | {"max_completion_tokens": 50, "min_completion_tokens": 2}
    plan = vllm_nixl.attempt(body, PrefillSide("p0", 2, 4, "10.0.0.5"), DecodeSide("d0", 1), "req-9")
    assert not plan.concurrent
    p = plan.prefill.body
    assert p["kv_transfer_params"] == vllm_nixl.PREFILL_PARAMS
    assert (p["stream"], p["max_tokens"], p["max_completion_tokens"]) == (False, 1, 1)
    for gone in ("stream_options", "min_tokens", "min_completion_tokens"):
        assert gone not in p
    assert plan.prefill.headers == {"X-Request-Id": "req-9", "X-data-parallel-rank": "2"}


def test_nixl_decode_leg_is_the_clients_body_with_the_returned_params():
    body = copy.deepcopy(CHAT)
    plan = vllm_nixl.attempt(body, PrefillSide("p0", 2, 4, "h"), DecodeSide("d0", 1), "req-9")
    decode = plan.decode(PREFILL_ANSWER)
    assert decode.body == CHAT | {"kv_transfer_params": PREFILL_ANSWER["kv_transfer_params"]}
    assert decode.headers == {"X-Request-Id": "req-9", "X-data-parallel-rank": "1"}
    assert body == CHAT


@pytest.mark.parametrize("answer", [None, {}, {"kv_transfer_params": None}, {"kv_transfer_params": {}}])
def test_a_prefill_answer_without_params_is_a_protocol_error(answer):
    plan = vllm_nixl.attempt(CHAT, PrefillSide("p0", 0, 1, "h"), DecodeSide("d0", 0), "r")
    with pytest.raises(PdProtocolError, match="kv_transfer_params"):
        plan.decode(answer)


def test_n_above_one_is_not_split():
    assert vllm_nixl.supports(CHAT) and vllm_nixl.supports(CHAT | {"n": 1})
    assert not vllm_nixl.supports(CHAT | {"n": 2})
    with pytest.raises(ValueError, match="n > 1"):
        vllm_nixl.attempt(CHAT | {"n": 2}, PrefillSide("p0", 0, 1, "h"), DecodeSide("d0", 0), "r")


# -- vLLM Mooncake -----------------------------------------------------------------------------------------

QUERY = json.dumps({"0": {"engine_id": "eng_dp0", "worker_addr": {}}, "1": {"engine_id": "eng_dp1"}})


def test_mooncake_legs_share_a_fresh_transfer_id_and_name_the_prefill_ranks_engine():
    ids = vllm_mooncake.parse_query(QUERY)
    assert ids == {0: "eng_dp0", 1: "eng_dp1"}
    prefill = PrefillSide("p0", 1, 2, "10.0.0.5", bootstrap_port=8998)
    a = vllm_mooncake.attempt(CHAT, prefill, DecodeSide("d0", 3), ids)
    b = vllm_mooncake.attempt(CHAT, prefill, DecodeSide("d0", 3), ids)
    assert a.concurrent and a.transfer_id != b.transfer_id and a.transfer_id.startswith("xfer-")
    p, d = a.prefill, a.decode()
    assert p.body["kv_transfer_params"] == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "transfer_id": a.transfer_id,
    }
    assert (p.body["stream"], p.body["max_tokens"]) == (False, 1) and "stream_options" not in p.body
    assert d.body == CHAT | {
        "kv_transfer_params": {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "transfer_id": a.transfer_id,
            "remote_engine_id": "eng_dp1",
            "remote_bootstrap_addr": "http://10.0.0.5:8998",
        }
    }
    assert p.headers == {"X-data-parallel-rank": "1"} and d.headers == {"X-data-parallel-rank": "3"}


def test_mooncake_needs_the_prefill_ranks_engine_id_and_a_bootstrap_port():
    with pytest.raises(PdProtocolError, match="DP rank 1"):
        vllm_mooncake.attempt(CHAT, PrefillSide("p0", 1, 2, "h", 8998), DecodeSide("d0", 0), {0: "eng_dp0"})
    with pytest.raises(ValueError, match="bootstrap port"):
        vllm_mooncake.attempt(CHAT, PrefillSide("p0", 0, 2, "h"), DecodeSide("d0", 0), {0: "eng_dp0"})
    ipv6 = vllm_mooncake.attempt(CHAT, PrefillSide("p0", 0, 1, "fd00::5", 8998), DecodeSide("d0", 0), {0: "e"})
    assert ipv6.decode().body["kv_transfer_params"]["remote_bootstrap_addr"] == "http://[fd00::5]:8998"


@pytest.mark.parametrize("text", ["nope", "[]", '{"x": {"engine_id": "e"}}', '{"0": {"engine_id": 5}}'])
def test_a_bad_query_answer_is_a_protocol_error(text):
    with pytest.raises(PdProtocolError):
        vllm_mooncake.parse_query(text)
