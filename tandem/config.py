"""Typed, validated run configuration.

Flower hands every app a flat mapping of kebab-case keys (``context.run_config``,
defaults in ``pyproject.toml``, overrides with ``flwr run . -c "key=value"``).
tandem reads that mapping exactly once per app (:meth:`RunConfig.from_flat`)
into frozen dataclasses, and passes those down. Every field declares its key,
its rule and a check (:func:`tandem.options.option`), so an invalid value stops
the run before training with one line naming the key, the value and the rule.

Methods add their own section by declaring a dataclass with :func:`option`
fields and naming it in the method registry (:mod:`tandem.registry`); the
sections of *every* registered method are validated on every run, whatever the
method, the chosen method's is kept in :attr:`RunConfig.options`, and any other
key is rejected. Dataset and model names are the keys of their registries
(:data:`tandem.datasets.DATASETS`, :data:`tandem.models.MODELS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from tandem.options import (
    ConfigError,
    Scalar,
    option,
    parse_section,
    reject_unknown_keys,
    section_keys,
    section_values,
)
from tandem.registry import (
    METHODS,
    get_method,
    method_option_classes,
    method_option_keys,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "all_keys",
    "option",
    "parse_section",
    "section_keys",
    "section_values",
]

T = TypeVar("T")


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


PARTITIONERS = ("iid", "dirichlet", "natural", "contiguous", "grouped")
#: Datasets whose rows carry natural ids (users, modules, speaking roles).
NATURAL_ID_DATASETS = ("wisdm", "pysource", "text")


def dataset_names() -> tuple[str, ...]:
    """The ``dataset`` choices: the keys of :data:`tandem.datasets.DATASETS`."""
    from tandem.datasets import DATASETS

    return tuple(DATASETS)


def model_names() -> tuple[str, ...]:
    """The ``model`` choices: ``auto`` and the keys of :data:`tandem.models.MODELS`."""
    from tandem.models import MODELS

    return ("auto", *MODELS)


def method_names() -> tuple[str, ...]:
    """The ``method`` choices: the keys of :data:`tandem.registry.METHODS`."""
    return tuple(METHODS)


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is split across nodes."""

    dataset: str = option("dataset", "mnist1d", choices=dataset_names)
    path: str = option("data-path", "")
    download: bool = option("data-download", False)
    mnist1d_samples: int = option(
        "mnist1d-samples", 10000, "must be at least 100", lambda n: n >= 100
    )
    wisdm_window: int = option(
        "wisdm-window", 200, "must be at least 8", lambda n: n >= 8
    )
    text_context: int = option(
        "text-context", 64, "must be at least 2 (tokens per example)", lambda n: n >= 2
    )
    text_max_bytes: int = option(
        "text-max-bytes",
        2_000_000,
        "must be >= 0 (bytes of text used; 0: all)",
        lambda n: n >= 0,
    )
    text_test_windows: int = option(
        "text-test-windows",
        1024,
        "must be >= 0 (test windows evaluated, evenly spaced; 0: all)",
        lambda n: n >= 0,
    )
    test_fraction: float = option(
        "test-fraction", 0.2, "must lie strictly between 0 and 1", _open_fraction
    )
    partitioner: str = option("partitioner", "iid", choices=PARTITIONERS)
    dirichlet_alpha: float = option(
        "dirichlet-alpha", 0.5, "must be > 0 (Dirichlet concentration)", _positive
    )
    partition_groups: int = option(
        "partition-groups",
        2,
        "must be >= 1 (groups of the grouped split)",
        lambda n: n >= 1,
    )
    seed: int = option("seed", 0, "must be >= 0", _non_negative)

    def __post_init__(self) -> None:
        if self.partitioner == "grouped" and self.dataset in NATURAL_ID_DATASETS:
            raise ConfigError(
                "partitioner",
                self.partitioner,
                "needs a dataset with class labels and no natural ids "
                f"(not '{self.dataset}'; use partitioner natural there)",
            )
        if self.dataset == "wisdm" and not self.path:
            raise ConfigError(
                "data-path", self.path, "must name a WISDM_ar_v1.1_raw.txt file"
            )
        if self.dataset == "text" and not self.path:
            raise ConfigError(
                "data-path", self.path, "must name a text or LEAF Shakespeare file"
            )
        if self.partitioner == "natural" and self.dataset not in NATURAL_ID_DATASETS:
            raise ConfigError(
                "partitioner",
                self.partitioner,
                "needs a dataset with natural ids "
                f"({', '.join(NATURAL_ID_DATASETS)}), not '{self.dataset}'",
            )


#: The optimizers a run trains with (``optimizer``): momentum SGD at ``lr``
#: with ``momentum``, or Adam at ``lr`` (betas 0.9, 0.999, eps 1e-8).
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation, shared by every method."""

    model: str = option("model", "auto", choices=model_names)
    local_steps: int = option("local-steps", 50, "must be >= 1", lambda n: n >= 1)
    local_epochs: float = option(
        "local-epochs", 0.0, "must be >= 0 (0: no cap)", lambda e: e >= 0
    )
    batch_size: int = option("batch-size", 32, "must be >= 1", lambda n: n >= 1)
    lr: float = option("lr", 0.05, "must be > 0", _positive)
    momentum: float = option(
        "momentum", 0.9, "must lie in [0, 1)", lambda m: 0.0 <= m < 1.0
    )
    optimizer: str = option("optimizer", "sgd", choices=OPTIMIZERS)
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

    method: str = option("method", "fedavg", choices=method_names)
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
    #: The chosen method's own section (``None`` for a method without one).
    options: object | None = None
    #: Every registered method's section, parsed and checked (see :meth:`section`).
    sections: tuple[object, ...] = ()

    @property
    def seed(self) -> int:
        """The run's seed (one value for data, model init and sampling)."""
        return self.train.seed

    @classmethod
    def from_flat(cls, flat: Mapping[str, object]) -> RunConfig:
        """Parse and validate a flat run config: every key, whatever the method.

        The core sections are parsed, unknown keys are rejected, and the option
        section of *every* registered method is parsed and validated (a bad
        ``acesync-*`` value stops a FedAvg run too); the chosen method's
        section is kept in :attr:`options`.

        Raises
        ------
        ConfigError
            For the first bad key: its name, its value and the rule.
        """
        cfg = parse_section(cls, flat)
        spec = get_method(cfg.method)
        reject_unknown_keys(flat, all_keys())
        sections = {kind: parse_section(kind, flat) for kind in method_option_classes()}
        chosen = None if spec.options is None else sections[spec.options]
        return dataclasses.replace(
            cfg, options=chosen, sections=tuple(sections.values())
        )

    def options_as(self, kind: type[T]) -> T:
        """The chosen method's section, checked to be a ``kind``.

        Raises
        ------
        TypeError
            If the method's section is not a ``kind`` (or it has none).
        """
        if not isinstance(self.options, kind):
            raise TypeError(
                f"method '{self.method}' has {type(self.options).__name__} "
                f"options, not {kind.__name__}"
            )
        return self.options

    def section(self, kind: type[T]) -> T:
        """Any registered method's parsed section, whatever the chosen method
        (for checks of its keys that need more than the key itself).

        Raises
        ------
        LookupError
            If no parsed section is a ``kind``.
        """
        for section in self.sections:
            if isinstance(section, kind):
                return section
        raise LookupError(f"no parsed option section of type {kind.__name__}")

    def as_flat(self) -> dict[str, Scalar]:
        """Every key with its effective value, the method's own included."""
        return section_values(self)


def all_keys() -> tuple[str, ...]:
    """Every accepted run-config key: the core ones and every method's."""
    return (*section_keys(RunConfig), *method_option_keys())
