"""Where each stored Response lives: the bounded, expiring map of the front door (time passed in)."""

from __future__ import annotations

import pytest

from gateway.server.responses import input_messages
from gateway.server.responses_store import ResponseHomes
from gateway.types import RankKey

A, B = RankKey("a", 0), RankKey("b", 3)


def test_remembers_and_renews_on_use() -> None:
    homes = ResponseHomes(10, ttl_s=60.0)
    homes.remember("resp_1", A, "m", now=0.0)
    assert homes.lookup("resp_1", now=50.0) is not None  # used at 50: lives until 110
    home = homes.lookup("resp_1", now=100.0)
    assert home is not None and home.rank == A and home.model == "m" and home.expires_at == 160.0
    assert homes.lookup("resp_1", now=160.0) is None
    assert homes.expired == 1 and len(homes) == 0


def test_least_recently_used_goes_first_beyond_the_bound() -> None:
    homes = ResponseHomes(2, ttl_s=1000.0)
    homes.remember("resp_1", A, "m", now=0.0)
    homes.remember("resp_2", B, "m", now=1.0)
    homes.lookup("resp_1", now=2.0)  # resp_2 is now the least recently used
    homes.remember("resp_3", A, "m", now=3.0)
    assert homes.lookup("resp_2", now=4.0) is None
    assert homes.lookup("resp_1", now=4.0) is not None and homes.lookup("resp_3", now=4.0) is not None
    assert homes.evicted == 1


def test_forget_one_and_forget_an_engine() -> None:
    homes = ResponseHomes(10, ttl_s=1000.0)
    for i, key in enumerate((A, B, A)):
        homes.remember(f"resp_{i}", key, "m", now=0.0)
    homes.forget("resp_1")
    assert homes.forget_engine("a") == 2
    assert len(homes) == 0


@pytest.mark.parametrize(("size", "ttl"), [(0, 1.0), (1, 0.0)])
def test_refuses_nonsense_bounds(size: int, ttl: float) -> None:
    with pytest.raises(ValueError, match="max_remembered"):
        ResponseHomes(size, ttl)


def test_input_is_read_as_chat_messages_for_the_estimate() -> None:
    items = [
        "plain",
        {"role": "user", "content": [{"type": "input_text", "text": "part"}]},
        {"type": "function_call_output", "call_id": "c", "output": "42"},
    ]
    assert input_messages(items, "be brief") == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "plain"},
        {"role": "user", "content": [{"type": "input_text", "text": "part"}]},
        {"role": "user", "content": "42"},
    ]
    assert input_messages("hi", None) == [{"role": "user", "content": "hi"}]
