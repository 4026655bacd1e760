"""The prompt as chained block hashes (``PendingRequest.prefix_blocks``), from text at the front door."""

from __future__ import annotations

import pytest

from gateway.tokens import prompt_texts
from gateway.types import PREFIX_BLOCK_CHARS, prefix_block_hashes


def test_prompts_share_leading_hashes_exactly_as_long_as_they_share_blocks() -> None:
    base = "a" * PREFIX_BLOCK_CHARS + "b" * PREFIX_BLOCK_CHARS
    one = prefix_block_hashes([base + "c" * 10])
    two = prefix_block_hashes([base + "d" * 10])
    assert len(one) == 3, "two full blocks and a partial one"
    assert one[:2] == two[:2] and one[2] != two[2]
    moved = prefix_block_hashes(["x" + base[1:] + "c" * 10])
    assert moved[1] != one[1], "a block's hash covers the whole prompt before it"
    assert prefix_block_hashes([]) == prefix_block_hashes([""]) == ()
    assert prefix_block_hashes(["ab", "c"]) != prefix_block_hashes(["a", "bc"]), "parts are delimited"


@pytest.mark.parametrize(
    ("body", "texts"),
    [
        (
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
            ["system", "be brief", "user", "hi"],
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url"}]}]},
            ["user", "look"],
        ),
        ({"prompt": "once upon"}, ["once upon"]),
        ({"prompt": ["a", "b"]}, ["a", "b"]),
        ({"prompt": [1, 2, 3]}, ["1 2 3"]),
        ({"prompt": [[1, 2], [3]]}, ["1 2", "3"]),
        ({}, []),
    ],
)
def test_the_front_door_hashes_the_prompt_text_in_order(body: dict[str, object], texts: list[str]) -> None:
    assert list(prompt_texts(body)) == texts
