"""Benchmark suites: which method variants run side by side.

Every variant of a suite runs on the same workload (dataset, partitions,
model, seeds, number of nodes); only its run-config overrides differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["SUITES", "Suite", "TokenWorkload", "Variant", "per_profile", "token_sized"]


@dataclass(frozen=True)
class Variant:
    """One column of the comparison.

    Attributes
    ----------
    label : str
        Name in tables, plots and ``results.json``.
    overrides : Mapping[str, object]
        Run-config keys for this variant (``method`` at least).
    schedule : str
        How its emulated time is computed from the run's records:
        ``"sync"`` re-times synchronous rounds
        (:func:`~tandem.schedules.replay_sync_rounds`), ``"pipeline"``
        re-times SimulTrain's exchanges
        (:func:`~tandem.schedules.replay_pipeline`).
    link_option : str
        The run-config key through which the method's policy reads the link
        (``acesync-link``: its budgets follow the bandwidth), or ``""`` when
        its traffic does not depend on the link. A variant that reads the
        link runs once per profile (:func:`per_profile`); the others run
        once and are re-timed under every profile.
    profile : str | None
        The profile this variant's runs were made under (set by
        :func:`per_profile`), or ``None``: re-timed under every profile.
    first_profile_only : bool
        A link-reading variant run under the first profile only (an ablation
        whose question is not timing).
    """

    label: str
    overrides: Mapping[str, object]
    schedule: str = "sync"
    link_option: str = ""
    profile: str | None = None
    first_profile_only: bool = False

    def __post_init__(self) -> None:
        method = self.overrides.get("method")
        if method == "fedavg-periodic" and "acesync-period" not in self.overrides:
            raise ValueError(
                f"variant '{self.label}': a fedavg-periodic variant must set "
                "acesync-period (its rounds' worth of local steps per sync)"
            )

    @property
    def period(self) -> int:
        """Rounds' worth of ``local-steps`` per sync: ``acesync-period`` for
        ``fedavg-periodic`` (each of its rounds runs that many times
        ``local-steps``), else 1."""
        if self.overrides.get("method") != "fedavg-periodic":
            return 1
        return int(self.overrides["acesync-period"])  # type: ignore[call-overload]

    @property
    def local_steps(self) -> int:
        """SGD steps per node per round (per report period, ``pipeline``)."""
        key = "simultrain-eval-every" if self.schedule == "pipeline" else "local-steps"
        return int(self.overrides.get(key, 50)) * self.period  # type: ignore[call-overload]


@dataclass(frozen=True)
class TokenWorkload:
    """A suite's default size on a token dataset (``pysource``, ``text``).

    A transformer step costs about 500 times a cnn1d step at the same batch
    (10.07 GFLOP against 19.1 MFLOP at batch 32, by torch's FLOP counter),
    so a suite keeps its variants and shrinks its work to fit the same time
    budget.

    Attributes
    ----------
    steps : int | None
        SGD steps per node (``None``: the suite's own).
    config : Mapping[str, object]
        Run-config values over every variant's own (``--config`` still
        wins), e.g. a smaller ``batch-size`` or fewer ``local-steps``.
    defaults : Mapping[str, object]
        Run-config values under every variant's own (an ablation that sets
        the key keeps its value), over the suite's ``defaults``.
    """

    steps: int | None = None
    config: Mapping[str, object] = field(default_factory=dict)
    defaults: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    """A named set of variants and the workload defaults they share."""

    name: str
    description: str
    variants: tuple[Variant, ...]
    defaults: Mapping[str, object] = field(default_factory=dict)
    nodes: int = 10
    rounds: int | None = 20
    steps: int | None = None
    #: Link profiles when ``--profile`` is not given (None: 4g and 5g).
    profiles: tuple[str, ...] | None = None
    #: Label of the variant the others are measured against: the target
    #: accuracy is its final accuracy minus ``reference_margin``, and the
    #: reference table gives each variant's bytes and rounds against it.
    reference: str | None = None
    reference_margin: float = 0.01
    #: Label of the variant along whose curve every variant is timed to
    #: several targets (:func:`~tandem.bench.runner.milestone_targets`;
    #: None: ``reference``, and no table when that is None too).
    milestones: str | None = None
    #: Width of a cnn1d on which ACE-Sync's edge overhead is also timed
    #: in-process (0: no probe); see :mod:`tandem.bench.overhead`.
    overhead_width: int = 0
    #: The suite's headline time ratios ``(numerator, denominator)``, by
    #: variant label (a per-profile variant ``x`` is ``x@<profile>``): the
    #: sensitivity table gives each at edge factor x0.5, x1 and x2.
    headline: tuple[tuple[str, str], ...] = ()
    #: Its default size on a token dataset (None: the same as on MNIST-1D).
    tokens: TokenWorkload | None = None


SUITES: dict[str, Suite] = {
    "fedavg": Suite(
        name="fedavg",
        description="Flower's FedAvg with 10 vs 50 local steps per round",
        variants=(
            Variant("fedavg-k10", {"method": "fedavg", "local-steps": 10}),
            Variant("fedavg-k50", {"method": "fedavg", "local-steps": 50}),
        ),
    ),
    "simultrain": Suite(
        name="simultrain",
        description=(
            "SimulTrain against its baselines and ablations (seeds 000-003): "
            "the same model, data and SGD steps per edge"
        ),
        variants=(
            Variant("centralized", {"method": "centralized", "local-steps": 50}),
            Variant("syncsgd", {"method": "syncsgd", "local-steps": 1}),
            Variant("fedavg-5", {"method": "fedavg", "local-steps": 5}),
            # W follows the link (simultrain-window = 0), so SimulTrain runs
            # under each profile (its ablations under the first only)
            Variant(
                "simultrain",
                {"method": "simultrain", "simultrain-eval-every": 50},
                schedule="pipeline",
                link_option="simultrain-link",
            ),
            # split learning without the pipeline: the same model, cut, chunk
            # and precision, one chunk in flight (the edge waits for each
            # chunk's gradients before it forwards the next), no forecast
            Variant(
                "splitsync",
                {
                    "method": "simultrain",
                    "simultrain-eval-every": 50,
                    "simultrain-window": 1,
                    "simultrain-alpha": 0.0,
                },
                schedule="pipeline",  # W = 1 whatever the link: re-timed
            ),
            Variant(
                "simultrain-alpha0",
                {
                    "method": "simultrain",
                    "simultrain-eval-every": 50,
                    "simultrain-alpha": 0.0,
                },
                schedule="pipeline",
                link_option="simultrain-link",
                first_profile_only=True,
            ),
            # no reconciliation (seed 001's ablation): every R steps each
            # edge still reports its delta, so the cloud's copy of the edge
            # layers (what evaluation uses) follows the edges, but no edge
            # is pulled toward it (lambda = 0): their staleness is what is
            # left. (R = 0 would stop the reports too and leave the copy at
            # its initial value until the end.)
            Variant(
                "simultrain-no-reconcile",
                {
                    "method": "simultrain",
                    "simultrain-eval-every": 50,
                    "simultrain-lambda": 0.0,
                },
                schedule="pipeline",
                link_option="simultrain-link",
                first_profile_only=True,
            ),
        ),
        nodes=2,
        rounds=None,
        steps=300,
        headline=(("simultrain", "syncsgd"), ("simultrain", "splitsync")),
        milestones="syncsgd",
        # the same 300 steps per edge at half the batch, and 256 test windows:
        # SyncSGD evaluates after each of its 300 steps (1,024 windows: ~2 s);
        # the edge's learning rate chosen on seeds 10 and 11 (not reported):
        # edge-lr-scale 0.5 ended at perplexity 16.62 +- 1.03, 0.25 at 10.41
        # +- 0.15 (lambda = 1 instead: 11.22 +- 1.51)
        tokens=TokenWorkload(
            config={"batch-size": 16, "text-test-windows": 256},
            defaults={"simultrain-edge-lr-scale": 0.25},
        ),
    ),
    "acesync": Suite(
        name="acesync",
        description=(
            "ACE-Sync against FullSync, Top-k, FedAvg-periodic and Flower's FedAvg "
            "(seed 004), and its magnitude-score ablation: the same model, "
            "Dirichlet non-IID data and SGD steps per edge, on a heterogeneous "
            "variable link mix"
        ),
        variants=(
            Variant("fedavg", {"method": "fedavg", "local-steps": 50}),
            Variant("fullsync", {"method": "fullsync", "local-steps": 50}),
            Variant("topk", {"method": "topk", "local-steps": 50}),
            Variant(
                "fedavg-periodic",
                {"method": "fedavg-periodic", "local-steps": 50, "acesync-period": 3},
            ),
            Variant(
                "acesync",
                {"method": "acesync", "local-steps": 50},
                link_option="acesync-link",
            ),
            Variant(
                "acesync-magnitude",
                {
                    "method": "acesync",
                    "local-steps": 50,
                    "acesync-importance": "magnitude",
                },
                link_option="acesync-link",
            ),
        ),
        defaults={"partitioner": "dirichlet", "dirichlet-alpha": 0.5},
        nodes=10,
        rounds=None,
        steps=1050,  # 21 rounds of 50 steps; fedavg-periodic: 7 syncs of 150
        profiles=("variable",),
        reference="fullsync",
        overhead_width=128,
        headline=(("acesync", "fullsync"),),
        # 21 rounds of 10 steps at batch 16 (fedavg-periodic: 7 syncs of 30):
        # a round's compute on the emulated edge is then of the order of its
        # slowest links' transfer of the model, the regime of seed 004
        tokens=TokenWorkload(steps=210, config={"batch-size": 16, "local-steps": 10}),
    ),
    "acesync-grouped": Suite(
        name="acesync-grouped",
        description=(
            "ACE-Sync with clusters that shape training (acesync-personalize: "
            "device -> cluster -> global every round, each device trains from "
            "its cluster's model) against plain ACE-Sync, on a grouped split "
            "whose groups label the same signals differently; every device "
            "evaluates the global model and its cluster's on its own test share"
        ),
        variants=(
            Variant(
                "acesync",
                {
                    "method": "acesync",
                    "local-steps": 50,
                    "acesync-personalize-rounds": 0,
                },
                link_option="acesync-link",
            ),
            Variant(
                "acesync-personal",
                {"method": "acesync", "local-steps": 50, "acesync-personalize": True},
                link_option="acesync-link",
            ),
        ),
        defaults={"partitioner": "grouped", "partition-groups": 3},
        nodes=10,
        rounds=None,
        steps=1050,
        profiles=("variable",),
    ),
}


def token_sized(suite: Suite) -> Suite:
    """``suite`` at its size on a token dataset (:class:`TokenWorkload`):
    its steps, its run-config values over every variant's and its
    defaults under them."""
    tokens = suite.tokens
    if tokens is None:
        return suite
    variants = tuple(
        dataclasses.replace(v, overrides={**v.overrides, **tokens.config})
        for v in suite.variants
    )
    return dataclasses.replace(
        suite,
        variants=variants,
        defaults={**suite.defaults, **tokens.defaults},
        steps=tokens.steps or suite.steps,
        tokens=None,
    )


def per_profile(suite: Suite, profiles: Sequence[str]) -> Suite:
    """``suite`` with each link-reading variant made once per profile.

    A variant with a ``link_option`` becomes one variant per profile, with
    that option set to the profile and ``profile`` recording it (the first
    profile only for a ``first_profile_only`` variant); its label gets
    ``@<profile>`` when it runs under more than one profile. Variants whose
    traffic does not depend on the link are kept as they are (re-timed
    under every profile after their one run).
    """
    variants: list[Variant] = []
    for variant in suite.variants:
        if not variant.link_option or variant.profile is not None:
            variants.append(variant)
            continue
        mine = profiles[:1] if variant.first_profile_only else profiles
        for profile in mine:
            label = variant.label if len(mine) == 1 else f"{variant.label}@{profile}"
            variants.append(
                dataclasses.replace(
                    variant,
                    label=label,
                    overrides={**variant.overrides, variant.link_option: profile},
                    profile=profile,
                )
            )
    return dataclasses.replace(suite, variants=tuple(variants))
