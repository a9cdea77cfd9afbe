"""Frozen, keyword-only configuration: every default written once, secrets never shown."""

from __future__ import annotations

import dataclasses

import pytest

from esm2cli import config
from esm2cli.config import (
    DEFAULT_MAX_TOKENS,
    BatchConfig,
    EmbedConfig,
    ModelConfig,
    ServeConfig,
    ShardConfig,
    describe,
)

CONFIGS = [cls for cls in vars(config).values() if isinstance(cls, type) and dataclasses.is_dataclass(cls)]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_configs_are_frozen_and_keyword_only(cls):
    params = cls.__dataclass_params__
    assert params.frozen, cls
    required = [
        f
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    instance = cls(**{f.name: 1 for f in required})
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(instance, dataclasses.fields(cls)[0].name, None)
    with pytest.raises(TypeError):
        cls(*([1] * max(1, len(dataclasses.fields(cls)))))


def test_batch_budget_is_decided_by_device_kind_unless_given():
    assert BatchConfig().for_devices(on_cuda=True).max_tokens == DEFAULT_MAX_TOKENS["cuda"]
    assert BatchConfig().for_devices(on_cuda=False).max_tokens == DEFAULT_MAX_TOKENS["cpu"]
    assert BatchConfig(max_tokens=5000).for_devices(on_cuda=True).max_tokens == 5000


def test_error_mode_sets_a_length_limit_only_there():
    assert EmbedConfig(long_sequences="error", truncate=300).max_length == 300
    assert EmbedConfig(long_sequences="truncate", truncate=300).max_length is None
    assert EmbedConfig(long_sequences="window").max_length is None


def test_api_keys_are_never_shown():
    cfg = ServeConfig(api_keys=("sk-secret-1", "sk-secret-2"))
    for text in (repr(cfg), str(cfg), describe(cfg)):
        assert "sk-secret" not in text
    assert "api_keys=<2 redacted>" in describe(cfg)


def test_describe_reads_nested_configs_as_name_value():
    line = describe(ModelConfig(model="esm2_t6_8M", dtype="float32"))
    assert "model=esm2_t6_8M" in line and "dtype=float32" in line and "simulate=-" in line


@pytest.mark.parametrize("count", [1, 3, 7, 2000])
def test_shard_ranges_cover_the_records_once(count):
    records = 1234
    ranges = [ShardConfig(index=i, count=count).range(records) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == records
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_part_names_sort_in_shard_order():
    names = [ShardConfig(index=i, count=12, suffix=".h5").part_name() for i in range(12)]
    assert names == sorted(names) and names[3] == "part-00003-of-00012.h5"
