"""Run-config parsing: defaults, types, rules and unknown names."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tandem.config import ConfigError, RunConfig, section_keys

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def _defaults() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_parse_and_match_dataclass_defaults():
    from_pyproject = RunConfig.from_flat(_defaults())
    from_nothing = RunConfig.from_flat({})
    assert from_pyproject == from_nothing
    assert from_pyproject.method == "fedavg"
    assert from_pyproject.data.dataset == "mnist1d"
    assert from_pyproject.train.local_steps == 50


def test_every_key_has_a_pyproject_default():
    from tandem.registry import method_option_keys

    keys = {*section_keys(RunConfig), *method_option_keys()}
    assert keys == set(_defaults())


def test_overrides_are_typed():
    cfg = RunConfig.from_flat({"lr": 1, "num-server-rounds": 3, "wandb": "true"})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.num_server_rounds == 3
    assert cfg.tracking.wandb is True


@pytest.mark.parametrize(
    ("flat", "key", "rule"),
    [
        ({"method": "nope"}, "method", "must be one of "),
        ({"dataset": "imagenet"}, "dataset", "must be one of mnist1d"),
        ({"partitioner": "shards"}, "partitioner", "must be one of iid"),
        ({"lr": -0.1}, "lr", "must be > 0"),
        ({"lr": 0}, "lr", "must be > 0"),
        ({"lr": float("nan")}, "lr", "finite"),
        ({"num-server-rounds": 0}, "num-server-rounds", "must be >= 1"),
        ({"dirichlet-alpha": 0.0}, "dirichlet-alpha", "must be > 0"),
        ({"dirichlet-alpha": -1.0}, "dirichlet-alpha", "must be > 0"),
        ({"local-steps": 2.5}, "local-steps", "must be an integer"),
        ({"batch-size": True}, "batch-size", "must be an integer"),
        ({"momentum": 1.0}, "momentum", "must lie in [0, 1)"),
        ({"device": "tpu"}, "device", "must be auto, cpu"),
        ({"fraction-train": 0.0}, "fraction-train", "must lie in (0, 1]"),
        ({"wandb-mode": "maybe"}, "wandb-mode", "must be one of offline"),
        ({"dataset": "wisdm"}, "data-path", "WISDM_ar_v1.1_raw.txt"),
        ({"partitioner": "natural"}, "partitioner", "natural ids"),
        ({"lr-rate": 0.1}, "lr-rate", "not a tandem run-config key"),
    ],
)
def test_invalid_values_name_key_value_and_rule(flat, key, rule):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat(flat)
    err = info.value
    assert err.key == key
    assert rule in str(err)
    assert f"'{key}'" in str(err)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'local-steps'"):
        RunConfig.from_flat({"local-step": 5})


def test_as_flat_round_trips():
    cfg = RunConfig.from_flat({"lr": 0.2, "dataset": "mnist", "model": "cnn2d"})
    assert RunConfig.from_flat(cfg.as_flat()) == cfg
