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


@pytest.mark.parametrize(
    ("flat", "key", "rule"),
    [
        ({"acesync-c-min": 1.5}, "acesync-c-min", "must lie in"),
        ({"acesync-codecs": "full,zip"}, "acesync-codecs", ""),
        ({"simultrain-precision": "int4"}, "simultrain-precision", "must be one of"),
        ({"simultrain-steps": 0}, "simultrain-steps", "must be >= 1"),
    ],
)
@pytest.mark.parametrize("method", ["fedavg", "centralized", "simultrain", "topk"])
def test_every_method_key_is_checked_whatever_the_method(method, flat, key, rule):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat({"method": method, **flat})
    assert info.value.key == key
    assert rule in str(info.value)
    assert "\n" not in str(info.value)


def test_the_method_section_is_parsed_once_and_typed():
    from tandem.protocol.acesync import AceSyncOptions
    from tandem.protocol.simultrain import SimulTrainOptions

    cfg = RunConfig.from_flat({"method": "simultrain", "simultrain-steps": 7})
    opts = cfg.options_as(SimulTrainOptions)
    assert isinstance(opts, SimulTrainOptions) and opts.steps == 7
    with pytest.raises(TypeError, match="not AceSyncOptions"):
        cfg.options_as(AceSyncOptions)
    assert cfg.as_flat()["simultrain-steps"] == 7
    fedavg = RunConfig.from_flat({"simultrain-steps": 7})
    assert fedavg.options is None  # checked, but FedAvg has no section
    with pytest.raises(TypeError, match="'fedavg' has NoneType options"):
        fedavg.options_as(SimulTrainOptions)


@pytest.mark.parametrize(
    ("key", "registry"),
    [("dataset", "tandem.datasets:DATASETS"), ("model", "tandem.models:MODELS")],
)
def test_name_choices_are_the_registry_keys(key, registry, monkeypatch):
    import importlib

    module, _, name = registry.partition(":")
    table = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat({key: "toy"})
    assert ", ".join(table) in str(info.value)
    monkeypatch.setitem(table, "toy", table[next(iter(table))])
    cfg = RunConfig.from_flat({key: "toy"})  # one registry line makes it valid
    assert (cfg.data.dataset if key == "dataset" else cfg.train.model) == "toy"


def test_registry_lookups_reject_unknown_names_with_the_list():
    from tandem.datasets import DATASETS, dataset_builder
    from tandem.models import MODELS, model_entry
    from tandem.registry import METHODS, get_method

    for lookup, key, names in (
        (dataset_builder, "dataset", DATASETS),
        (model_entry, "model", MODELS),
        (get_method, "method", METHODS),
    ):
        with pytest.raises(ConfigError) as info:
            lookup("nope")
        assert info.value.key == key and info.value.value == "nope"
        assert all(name in info.value.rule for name in names)


def test_the_client_app_parses_a_run_config_once(monkeypatch):
    from flwr.app import Context, RecordDict

    import tandem.client_app as client_app

    calls = []
    real = RunConfig.from_flat
    monkeypatch.setattr(
        RunConfig, "from_flat", classmethod(lambda cls, f: calls.append(1) or real(f))
    )
    client_app._parsed.cache_clear()
    flat = {"lr": 0.125, "seed": 3}
    contexts = [Context(9, n, {}, RecordDict(), dict(flat)) for n in (1, 2, 1)]
    cfgs = [client_app.run_config_of(c) for c in contexts]
    assert len(calls) == 1 and cfgs[0] is cfgs[1] is cfgs[2]
    assert cfgs[0].train.lr == 0.125
    other = Context(9, 1, {}, RecordDict(), {**flat, "lr": 0.5})  # another config
    assert client_app.run_config_of(other).train.lr == 0.5 and len(calls) == 2
    with pytest.raises(ConfigError, match="'lr' = -1"):
        client_app.run_config_of(Context(10, 1, {}, RecordDict(), {"lr": -1}))


def test_a_dataset_and_a_model_added_by_one_registry_line_are_used(monkeypatch):
    import math
    from collections import OrderedDict

    import numpy as np
    import torch
    from torch import nn

    from tandem.datasets import DATASETS, ArraySplit, DataBundle, load_dataset
    from tandem.models import MODELS, ModelEntry, build_model

    def toy_data(cfg):
        x = np.arange(24, dtype=np.float32).reshape(6, 1, 4)
        split = ArraySplit(x, np.array([0, 1, 0, 1, 0, 1]))
        return DataBundle("toy", split, split, ("a", "b"))

    def toy_model(input_shape, num_classes):
        return nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc=nn.Linear(math.prod(input_shape), num_classes),
            )
        )

    monkeypatch.setitem(DATASETS, "toy-data", toy_data)
    monkeypatch.setitem(MODELS, "toy-model", ModelEntry(toy_model, "flatten"))
    cfg = RunConfig.from_flat({"dataset": "toy-data", "model": "toy-model"})
    bundle = load_dataset(cfg.data)
    assert bundle.name == "toy" and len(bundle.train) == 6
    model = build_model(cfg.train.model, bundle.input_shape, bundle.num_classes)
    assert model(torch.from_numpy(bundle.train.x)).shape == (6, 2)
