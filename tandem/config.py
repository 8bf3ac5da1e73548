"""Typed, validated run configuration.

Flower hands every app a flat mapping of kebab-case keys (``context.run_config``,
defaults in ``pyproject.toml``, overrides with ``flwr run . -c "key=value"``).
tandem reads that mapping exactly once, at the edge of each app, into frozen
dataclasses, and passes those down. Every field declares its key, its rule and a
check, so an invalid value stops the run before training with a message naming
the key, the value and the rule.

Methods add their own section by declaring a dataclass with :func:`option`
fields and registering it (see :mod:`tandem.registry`); their keys are then
accepted and validated like the core ones, and any other key is rejected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, get_type_hints

__all__ = [
    "ConfigError",
    "DataConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "option",
    "parse_section",
    "section_keys",
]

T = TypeVar("T")
Scalar = bool | int | float | str


class ConfigError(ValueError):
    """An invalid run-config value: names the key, the value and the rule."""

    def __init__(self, key: str, value: object, rule: str) -> None:
        self.key = key
        self.value = value
        self.rule = rule
        super().__init__(f"run config '{key}' = {value!r}: {rule}")


def option(
    key: str,
    default: Scalar,
    rule: str = "",
    check: Callable[[Any], bool] | None = None,
    choices: Iterable[str] | None = None,
) -> Any:
    """Declare a dataclass field read from the run-config ``key``.

    Parameters
    ----------
    key : str
        The flat kebab-case run-config key.
    default : bool | int | float | str
        The value used when the key is absent.
    rule : str (default: "")
        The rule in words, shown when ``check`` fails.
    check : callable, optional
        Returns ``True`` for an acceptable value.
    choices : iterable of str, optional
        The accepted values of a string option (the rule is derived from them).
    """
    meta = {"key": key, "rule": rule, "check": check, "choices": None}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=meta)


def _coerce(key: str, value: object, kind: type) -> Scalar:
    """Convert a run-config value to the field's type, strictly."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(key, value, "must be true or false")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, value, "must be an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, value, "must be a number")
        if not math.isfinite(float(value)):
            raise ConfigError(key, value, "must be a finite number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
        return value
    raise TypeError(f"unsupported option type {kind!r} for '{key}'")


def section_keys(cls: type) -> tuple[str, ...]:
    """Run-config keys read by the dataclass ``cls`` (and its nested sections)."""
    keys: list[str] = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "key" in f.metadata:
            keys.append(f.metadata["key"])
        elif dataclasses.is_dataclass(hints[f.name]):
            keys.extend(section_keys(hints[f.name]))
    return tuple(keys)


def section_values(section: object) -> dict[str, Scalar]:
    """Every run-config key of a parsed section (and nested ones) with its value."""
    out: dict[str, Scalar] = {}
    if section is None:
        return out
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        if "key" in f.metadata:
            out[f.metadata["key"]] = value
        elif dataclasses.is_dataclass(value):
            out.update(section_values(value))
    return out


def parse_section(cls: type[T], flat: Mapping[str, object]) -> T:
    """Build the frozen dataclass ``cls`` from a flat run-config mapping.

    Missing keys take their defaults; present ones are type-checked and
    validated. Nested dataclass fields are parsed from the same mapping.

    Raises
    ------
    ConfigError
        If a value has the wrong type, is not one of the choices or breaks the
        field's rule.
    """
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[f.name]
        if "key" not in f.metadata:
            if dataclasses.is_dataclass(kind):
                values[f.name] = parse_section(kind, flat)  # type: ignore[arg-type]
            continue
        key = f.metadata["key"]
        raw = flat.get(key, f.default)
        value = _coerce(key, raw, kind)
        choices = f.metadata["choices"]
        if choices is not None and value not in choices:
            raise ConfigError(key, value, f"must be one of {', '.join(choices)}")
        check = f.metadata["check"]
        if check is not None and not check(value):
            raise ConfigError(key, value, f.metadata["rule"])
        values[f.name] = value
    return cls(**values)


def reject_unknown_keys(flat: Mapping[str, object], known: Iterable[str]) -> None:
    """Raise :class:`ConfigError` for the first key that no section reads."""
    known = set(known)
    for key in sorted(flat):
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(key, flat[key], f"is not a tandem run-config key{hint}")


def _positive(x: float) -> bool:
    return x > 0


def _non_negative(x: float) -> bool:
    return x >= 0


def _fraction(x: float) -> bool:
    return 0.0 <= x <= 1.0


def _open_fraction(x: float) -> bool:
    return 0.0 < x < 1.0


def _device(spec: str) -> bool:
    if spec in ("auto", "cpu", "cuda", "mps"):
        return True
    head, _, index = spec.partition(":")
    return head == "cuda" and index.isdigit()


DATASETS = ("mnist1d", "wisdm", "mnist", "cifar10")
PARTITIONERS = ("iid", "dirichlet", "natural")
MODELS = ("auto", "cnn1d", "cnn2d", "mlp", "resnet18")


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is split across nodes."""

    dataset: str = option("dataset", "mnist1d", choices=DATASETS)
    path: str = option("data-path", "")
    download: bool = option("data-download", False)
    mnist1d_samples: int = option(
        "mnist1d-samples", 10000, "must be at least 100", lambda n: n >= 100
    )
    wisdm_window: int = option(
        "wisdm-window", 200, "must be at least 8", lambda n: n >= 8
    )
    test_fraction: float = option(
        "test-fraction", 0.2, "must lie strictly between 0 and 1", _open_fraction
    )
    partitioner: str = option("partitioner", "iid", choices=PARTITIONERS)
    dirichlet_alpha: float = option(
        "dirichlet-alpha", 0.5, "must be > 0 (Dirichlet concentration)", _positive
    )
    seed: int = option("seed", 0, "must be >= 0", _non_negative)

    def __post_init__(self) -> None:
        if self.dataset == "wisdm" and not self.path:
            raise ConfigError(
                "data-path", self.path, "must name a WISDM_ar_v1.1_raw.txt file"
            )
        if self.partitioner == "natural" and self.dataset != "wisdm":
            raise ConfigError(
                "partitioner",
                self.partitioner,
                f"needs a dataset with natural ids (wisdm), not '{self.dataset}'",
            )


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation, shared by every method."""

    model: str = option("model", "auto", choices=MODELS)
    local_steps: int = option("local-steps", 50, "must be >= 1", lambda n: n >= 1)
    local_epochs: float = option(
        "local-epochs", 0.0, "must be >= 0 (0: no cap)", lambda e: e >= 0
    )
    batch_size: int = option("batch-size", 32, "must be >= 1", lambda n: n >= 1)
    lr: float = option("lr", 0.05, "must be > 0", _positive)
    momentum: float = option(
        "momentum", 0.9, "must lie in [0, 1)", lambda m: 0.0 <= m < 1.0
    )
    device: str = option(
        "device", "auto", "must be auto, cpu, cuda, cuda:N or mps", _device
    )
    edge_device: str = option(
        "edge-device", "cpu", "must be auto, cpu, cuda, cuda:N or mps", _device
    )
    seed: int = option("seed", 0, "must be >= 0", _non_negative)


@dataclass(frozen=True)
class TrackingConfig:
    """Where metrics go: always a JSON-lines file, optionally W&B."""

    output_dir: str = option(
        "output-dir", "runs", "must not be empty", lambda s: bool(s)
    )
    wandb: bool = option("wandb", False)
    wandb_project: str = option(
        "wandb-project", "tandem", "must not be empty", lambda s: bool(s)
    )
    wandb_entity: str = option("wandb-entity", "")
    wandb_mode: str = option(
        "wandb-mode", "offline", choices=("offline", "online", "disabled")
    )


@dataclass(frozen=True)
class RunConfig:
    """The whole run configuration, read once per app invocation."""

    method: str = option("method", "fedavg")
    num_server_rounds: int = option(
        "num-server-rounds", 20, "must be >= 1", lambda n: n >= 1
    )
    fraction_train: float = option(
        "fraction-train", 1.0, "must lie in (0, 1]", lambda f: 0.0 < f <= 1.0
    )
    fraction_evaluate: float = option(
        "fraction-evaluate", 0.0, "must lie in [0, 1]", _fraction
    )
    min_nodes: int = option("min-nodes", 2, "must be >= 1", lambda n: n >= 1)
    reply_timeout: float = option(
        "reply-timeout",
        300.0,
        "must be > 0 (seconds a node may take to answer; also the messages' TTL)",
        lambda t: t > 0,
    )
    checkpoint_every: int = option(
        "checkpoint-every",
        1,
        "must be >= 0 (rounds between server checkpoints; 0 = none)",
        lambda n: n >= 0,
    )
    resume: str = option("resume", "")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    @property
    def seed(self) -> int:
        """The run's seed (one value for data, model init and sampling)."""
        return self.train.seed

    @classmethod
    def from_flat(cls, flat: Mapping[str, object]) -> RunConfig:
        """Parse and validate a flat run config, rejecting unknown keys.

        The method named by ``method`` must be registered; its own option
        section (if any) is validated too, see :func:`tandem.registry.get_method`.
        """
        from tandem.registry import get_method, method_option_keys

        cfg = parse_section(cls, flat)
        spec = get_method(cfg.method)
        reject_unknown_keys(flat, (*section_keys(cls), *method_option_keys()))
        if spec.options is not None:
            parse_section(spec.options, flat)
        return cfg

    def method_options(self, flat: Mapping[str, object]) -> Any:
        """The registered method's own option section, parsed from ``flat``."""
        from tandem.registry import get_method

        spec = get_method(self.method)
        return None if spec.options is None else parse_section(spec.options, flat)

    def as_flat(self) -> dict[str, Scalar]:
        """Every core key with its effective value (for tracking)."""
        return section_values(self)
