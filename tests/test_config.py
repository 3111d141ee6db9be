from __future__ import annotations

import pytest
from pydantic import ValidationError

from autobatch.config import (
    BatchConfig,
    DataConfig,
    EstimatorConfig,
    FitConfig,
    LogConfig,
    LRConfig,
    MemoryConfig,
    parse_bytes,
)
from autobatch.policies import GNSPolicy, RampPolicy
from autobatch.registry import LR_SCALINGS, POLICIES
from autobatch.scaling import SqrtScaling


def test_defaults_match_the_documented_values() -> None:
    cfg = FitConfig()
    assert (cfg.batch.initial_batch_size, cfg.batch.min_batch_size, cfg.batch.max_batch_size) == (32, None, None)
    assert (cfg.batch.policy, cfg.batch.decide_every, cfg.batch.max_growth) == ("budget", 10, 2.0)
    assert (cfg.batch.hysteresis, cfg.batch.noise_multiplier, cfg.batch.round_to) == (0.05, 1.0, 8)
    # the budget policy asks for the linear rule when the config names none
    assert (cfg.lr.lr_scaling, cfg.lr.lr_milestones, cfg.lr.lr_decay, cfg.lr.warmup_steps) == ("linear", [], 0.1, 0)
    assert (cfg.estimator.gns_method, cfg.estimator.gns_smoothing, cfg.estimator.gns_min_updates) == ("micro", 0.95, 3)
    assert (cfg.memory.probe_memory, cfg.memory.memory_budget, cfg.memory.memory_margin) == (None, None, 0.1)
    assert (cfg.data.shuffle, cfg.data.seed, cfg.data.num_workers) == (True, 0, None)
    assert (cfg.log.progress, cfg.log.eval_every, cfg.log.log_every) == (None, None, 1)
    assert cfg.max_nonfinite_steps == 5


def test_field_names_are_unique_across_sections() -> None:
    # Flat overrides rely on it.
    sections = [BatchConfig, LRConfig, EstimatorConfig, MemoryConfig, DataConfig, LogConfig]
    names = [name for model in sections for name in model.model_fields]
    names += [n for n in FitConfig.model_fields if n not in {"batch", "lr", "estimator", "memory", "data", "log"}]
    assert len(names) == len(set(names))


def test_flat_overrides_land_in_their_sections() -> None:
    cfg = FitConfig.from_any(None, policy="goodput", max_batch_size=512, seed=7, gns_smoothing=0.9)
    assert cfg.batch.policy == "goodput" and cfg.batch.max_batch_size == 512
    assert cfg.data.seed == 7 and cfg.estimator.gns_smoothing == 0.9
    assert cfg.batch.initial_batch_size == 32  # untouched fields keep their defaults


def test_nested_and_flat_forms_mix_and_later_entries_win() -> None:
    base = {"batch": {"initial_batch_size": 16, "policy": "fixed"}, "lr_decay": 0.5}
    cfg = FitConfig.from_any(base, batch={"policy": "gns"}, max_batch_size=64, log={"log_every": 3})
    assert (cfg.batch.initial_batch_size, cfg.batch.policy, cfg.batch.max_batch_size) == (16, "gns", 64)
    assert cfg.lr.lr_decay == 0.5 and cfg.log.log_every == 3
    assert base == {"batch": {"initial_batch_size": 16, "policy": "fixed"}, "lr_decay": 0.5}


def test_from_a_config_overrides_without_touching_the_original() -> None:
    original = FitConfig.from_any(None, initial_batch_size=8, lr_milestones=[2, 4])
    cfg = FitConfig.from_any(original, seed=3, lr=LRConfig(lr_decay=0.5, lr_milestones=[1]))
    assert cfg.batch.initial_batch_size == 8 and cfg.data.seed == 3
    assert cfg.lr.lr_milestones == [1] and cfg.lr.lr_decay == 0.5
    assert original.data.seed == 0 and original.lr.lr_milestones == [2, 4]
    assert FitConfig.from_any(original) == original


def test_instances_of_plugins_are_accepted_and_kept() -> None:
    policy, scaling = GNSPolicy(noise_multiplier=2.0), SqrtScaling(cap_at_noise_scale=False)
    cfg = FitConfig.from_any(None, policy=policy, lr_scaling=scaling)
    assert cfg.batch.policy is policy and cfg.lr.lr_scaling is scaling
    again = FitConfig.from_any(cfg, seed=1)
    assert again.batch.policy is policy


def test_unknown_keys_are_listed_with_close_matches() -> None:
    with pytest.raises(ValueError, match=r"'max_grwth' \(did you mean max_growth\?\), 'bogus'; valid settings: .*round_to"):
        FitConfig.from_any(None, max_grwth=3.0, bogus=1)
    with pytest.raises(ValueError, match=r"'batch.polcy' \(did you mean policy\?\)"):
        FitConfig.from_any({"batch": {"polcy": "gns"}})


def test_every_invalid_field_is_reported_at_once() -> None:
    bad = {
        "batch": {"initial_batch_size": 64, "min_batch_size": 128, "max_batch_size": 16, "policy": "gnss"},
        "lr_scaling": "lin",
        "decide_every": 0,
        "memory_budget": "3 parsecs",
    }
    with pytest.raises(ValidationError) as info:
        FitConfig.from_any(bad)
    locs = {err["loc"] for err in info.value.errors()}
    assert locs == {
        ("batch", "max_batch_size"),  # all the bounds' problems, in one entry
        ("batch", "policy"),
        ("batch", "decide_every"),
        ("lr", "lr_scaling"),
        ("memory", "memory_budget"),
    }
    text = str(info.value)
    assert "min_batch_size must be <= initial_batch_size (got min_batch_size=128, initial_batch_size=64)" in text
    assert "max_batch_size must be >= initial_batch_size (got max_batch_size=16, initial_batch_size=64)" in text


@pytest.mark.parametrize(
    ("bounds", "messages"),
    [
        ((8, 32, 8), ["min_batch_size must be <= initial_batch_size (got min_batch_size=32, initial_batch_size=8)",
                      "max_batch_size must be >= min_batch_size (got max_batch_size=8, min_batch_size=32); raise"]),
        ((32, 64, 16), ["min_batch_size must be <= initial_batch_size (got min_batch_size=64, initial_batch_size=32)",
                        "max_batch_size must be >= initial_batch_size (got max_batch_size=16, initial_batch_size=32)",
                        "max_batch_size must be >= min_batch_size (got max_batch_size=16, min_batch_size=64)"]),
        ((32, 48, None), ["min_batch_size must be <= initial_batch_size (got min_batch_size=48, initial_batch_size=32)"]),
    ],
)
def test_every_violated_bound_is_reported_with_values_and_fix(
    bounds: tuple[int, int, int | None], messages: list[str]
) -> None:
    b0, lo, hi = bounds
    with pytest.raises(ValidationError) as info:
        FitConfig.from_any(None, initial_batch_size=b0, min_batch_size=lo, max_batch_size=hi)
    text = str(info.value)
    assert all(m in text for m in messages)
    assert text.count("must be") == len(messages)


def test_unknown_names_list_the_registries() -> None:
    allowed_policies = ", ".join(sorted(POLICIES))
    with pytest.raises(ValidationError, match=f"unknown policy 'gnss'; allowed: {allowed_policies}, or a "
                                              r"BatchSizePolicy instance; did you mean 'gns'\?"):
        FitConfig.from_any(None, policy="gnss")
    allowed_scalings = ", ".join(sorted(LR_SCALINGS))
    with pytest.raises(ValidationError, match=f"unknown lr_scaling 'lin'; allowed: {allowed_scalings}, None"):
        FitConfig.from_any(None, lr_scaling="lin")
    # Neither a name nor an instance of the family's base class.
    with pytest.raises(ValidationError, match=r"unknown policy 3; allowed: .*BatchSizePolicy instance \["):
        FitConfig.from_any(None, policy=3)
    with pytest.raises(ValidationError, match=r"unknown lr_scaling GNSPolicy\(noise_multiplier=1.0, .*LRScaling instance \["):
        FitConfig.from_any(None, lr_scaling=GNSPolicy())


def test_assignment_is_validated() -> None:
    cfg = FitConfig.from_any(None, initial_batch_size=32)
    cfg.batch.max_batch_size = 1024
    with pytest.raises(ValidationError, match="max_batch_size must be >= initial_batch_size"):
        cfg.batch.max_batch_size = 16


def test_ramp_needs_milestones_and_a_decay() -> None:
    with pytest.raises(ValidationError) as info:
        FitConfig.from_any(None, policy="ramp", lr_decay=1.0)
    errors = {err["loc"]: err["msg"] for err in info.value.errors()}
    assert set(errors) == {("lr", "lr_milestones"), ("lr", "lr_decay")}
    assert errors[("lr", "lr_milestones")].startswith(
        "policy='ramp': RampPolicy needs lr_milestones (got lr_milestones=[]); give the epochs")
    assert errors[("lr", "lr_decay")].startswith("policy='ramp': RampPolicy needs 0 < lr_decay < 1 (got lr_decay=1.0)")
    cfg = FitConfig.from_any(None, policy="ramp", lr_milestones=[3, 6])
    assert cfg.lr.lr_milestones == [3, 6]
    # The ramp grows B in place of decaying the LR, so the default rule does not scale the LR.
    assert cfg.lr.lr_scaling == "none"
    assert FitConfig.from_any(None, policy="ramp", lr_milestones=[3], lr_scaling="sqrt").lr.lr_scaling == "sqrt"
    assert FitConfig.from_any(None, policy="gns").lr.lr_scaling is None
    assert FitConfig.from_any(None, policy=RampPolicy(lr_milestones=[2])).lr.lr_scaling == "none"


def test_what_a_policy_needs_is_reported_with_every_other_invalid_field() -> None:
    bad = {"policy": "ramp", "decide_every": 0, "memory_budget": "3 parsecs", "lr_decay": 1.0}
    with pytest.raises(ValidationError) as info:
        FitConfig.from_any(bad)
    assert {err["loc"] for err in info.value.errors()} == {
        ("batch", "decide_every"),
        ("memory", "memory_budget"),
        ("lr", "lr_milestones"),  # the ramp's needs, though other fields of batch are invalid
        ("lr", "lr_decay"),
    }
    # A setting that is itself invalid is reported once, for its own rule: the ramp is not
    # judged on a stand-in default.
    with pytest.raises(ValidationError) as info:
        FitConfig.from_any(None, policy="ramp", lr_milestones=[3, 1], lr_decay=0.5)
    assert [(err["loc"], err["type"]) for err in info.value.errors()] == [(("lr", "lr_milestones"), "value_error")]
    # Assigning a section runs the same check.
    cfg = FitConfig.from_any(None, lr_milestones=[2])
    cfg.batch = BatchConfig(policy="ramp")
    assert cfg.lr.lr_scaling == "none"
    with pytest.raises(ValidationError, match="RampPolicy needs lr_milestones"):
        FitConfig().batch = BatchConfig(policy="ramp")


def test_settings_are_flat_and_keep_instances() -> None:
    policy = GNSPolicy()
    settings = FitConfig.from_any(None, policy=policy, seed=4).settings()
    assert settings["policy"] is policy and settings["seed"] == 4 and settings["max_nonfinite_steps"] == 5
    assert "batch" not in settings and len(settings) == len(set(settings))


@pytest.mark.parametrize("milestones", [[5, 3], [2, 2], [-1, 4]])
def test_milestones_must_be_increasing_epochs(milestones: list[int]) -> None:
    with pytest.raises(ValidationError, match=r"lr_milestones must be strictly increasing epochs >= 0"):
        FitConfig.from_any(None, lr_milestones=milestones)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 * 1024**3),
        ("500MB", 500 * 1000**2),
        ("1.5KiB", 1536),
        ("2 mib", 2 * 1024 * 1024),
        ("1e3", 1000),
        ("123", 123),
        ("1TB", 10**12),
        (4096, 4096),
    ],
)
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_memory_budget_strings_become_bytes() -> None:
    assert FitConfig.from_any(None, memory_budget="4GiB").memory.memory_budget == 4 * 2**30


@pytest.mark.parametrize("text", ["4 parsecs", "GiB", "4 G iB", ""])
def test_parse_bytes_rejects_bad_units(text: str) -> None:
    with pytest.raises(ValueError, match=r"cannot read memory size .*e\.g\. '4GiB'"):
        parse_bytes(text)


def test_parse_bytes_rejects_non_positive_and_non_numbers() -> None:
    with pytest.raises(ValueError, match=r"must be > 0 bytes \(got '0MB'\)"):
        parse_bytes("0MB")
    with pytest.raises(TypeError, match="got bool"):
        parse_bytes(True)
