"""The registry of policies and allocators agrees with the configuration, and each entry builds."""

from __future__ import annotations

import typing
from typing import get_args

import pytest

from gateway.config import AllocatorConfig, DecodeConfig, PhaseAwareConfig, PolicyName
from gateway.scheduling.allocators import ALLOCATORS
from gateway.scheduling.baselines import IMMEDIATE_POLICIES, make_immediate_policy
from gateway.scheduling.scheduler import PhasePlacement
from gateway.scheduling.step_clock import StepClock
from tests.helpers import rank, req


def allocator_configs() -> list[type]:
    union = get_args(AllocatorConfig)[0]
    return [get_args(variant)[0] for variant in get_args(union)]


def test_the_configuration_names_exactly_the_registered_policies() -> None:
    assert set(get_args(PolicyName)) == {"sbs", *IMMEDIATE_POLICIES}


def test_the_configuration_kinds_are_exactly_the_registered_allocators() -> None:
    kinds = [typing.cast(typing.Any, config).model_fields["kind"].default for config in allocator_configs()]
    assert sorted(kinds) == sorted(ALLOCATORS)


@pytest.mark.parametrize("name", sorted(IMMEDIATE_POLICIES))
def test_every_registered_policy_builds_under_its_name_and_places(name: str) -> None:
    steps = PhasePlacement(PhaseAwareConfig(), DecodeConfig(), StepClock(0.05))  # what the scheduler passes
    policy = make_immediate_policy(name, seed=1, steps=steps)
    assert policy.name == name
    assert policy.choose(req("r", 100), [rank("e", 0), rank("e", 1)]) is not None


@pytest.mark.parametrize("config", allocator_configs(), ids=lambda c: c.__name__)
def test_every_registered_allocator_builds_from_its_defaults_and_places(config: type) -> None:
    settings = typing.cast(typing.Any, config)()
    allocator = ALLOCATORS[settings.kind](settings, DecodeConfig(), StepClock(0.05), None)
    allocation = allocator.place([req("r", 100)], [rank("e", 0), rank("e", 1)], 0.0)
    assert [request.request_id for request, _ in allocation.assigned] == ["r"]
