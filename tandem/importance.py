"""ACE-Sync importance: features, the two-branch predictor, labels, training.

Pure numpy and torch; no Flower imports. Notation of the ACE-Sync seed (004):
the model is cut into parameter groups ``θ_i`` (whole tensors or fixed-size
chunks of them) and every group gets an importance score in ``[0, 1]`` that
the edge's selection (seed eq. 2) and knapsack work from.

- Importance (seed eq. 3):
  ``I(θ_i) = α·Attn_temp(g_i) + (1 − α)·Attn_struct(θ_i)``.
- Temporal branch (seed eq. 4): ``Attn_temp(g_i) = σ(W1·g_i + W2·Var(g_i))``
  over each group's recent update magnitudes (:func:`temporal_features`).
- Structural branch: ``Attn_struct(θ_i) = σ(MLP(s_i))`` over layer depth,
  layer size, density and layer kind (:func:`structural_features`); the seed
  names depth, parameter density and receptive field without a formula.
- Labels: the cloud trains the predictor on the realized aggregated update
  (the seed's "ground-truth importance labels"), see :func:`importance_labels`.
- Ablation: :func:`magnitude_scores`, the latest update magnitude alone.

The predictor travels to the edges as named float32 arrays
(:func:`predictor_to_arrays`), never pickled; :func:`predictor_from_arrays`
checks every name, shape, dtype and value before building a module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from tandem.optim import Adam

__all__ = [
    "DEFAULT_HIDDEN",
    "KINDS",
    "STRUCTURAL_FEATURES",
    "TEMPORAL_FEATURES",
    "GroupMeta",
    "ImportancePredictor",
    "PredictorError",
    "importance_labels",
    "layer_kind",
    "magnitude_scores",
    "predict_importance",
    "predictor_from_arrays",
    "predictor_to_arrays",
    "structural_features",
    "temporal_features",
    "train_predictor",
]

#: Layer kinds with a one-hot column each; any other kind is all zeros.
KINDS = ("conv", "linear", "norm", "bias")
#: Columns of :func:`temporal_features`.
TEMPORAL_FEATURES = ("latest", "mean", "variance")
#: Columns of :func:`structural_features`.
STRUCTURAL_FEATURES = ("depth", "log10_layer_size", "relative_size", "density", *KINDS)
#: Hidden width of the structural branch's MLP.
DEFAULT_HIDDEN = 16


class PredictorError(ValueError):
    """Predictor arrays that do not match the expected layout; names the key."""

    def __init__(self, key: str, rule: str) -> None:
        self.key = key
        self.rule = rule
        super().__init__(f"predictor array '{key}': {rule}")


@dataclass(frozen=True)
class GroupMeta:
    """What the structural branch knows about one parameter group.

    Attributes
    ----------
    name : str
        The tensor's name in the model's state dict.
    depth : int
        Depth index of the tensor's layer (0 = nearest the input).
    size : int
        Number of elements in the group.
    layer_size : int
        Number of elements in the group's whole tensor (``>= size``).
    kind : str
        Layer kind, one of :data:`KINDS` or anything else for "other"
        (see :func:`layer_kind`).
    density : float (default: 1.0)
        Fraction of the group's parameters that are nonzero, in ``[0, 1]``.
    """

    name: str
    depth: int
    size: int
    layer_size: int
    kind: str
    density: float = 1.0

    def __post_init__(self) -> None:
        if self.depth < 0:
            raise ValueError(f"GroupMeta '{self.name}': depth must be >= 0")
        if not 0 < self.size <= self.layer_size:
            raise ValueError(
                f"GroupMeta '{self.name}': need 0 < size <= layer_size, "
                f"got size={self.size}, layer_size={self.layer_size}"
            )
        if not 0.0 <= self.density <= 1.0:
            raise ValueError(
                f"GroupMeta '{self.name}': density must be in [0, 1], "
                f"got {self.density}"
            )


def layer_kind(name: str, shape: Sequence[int]) -> str:
    """Guess a tensor's layer kind from its name and shape.

    ``*bias`` → ``"bias"``; 3-D or more → ``"conv"``; 2-D → ``"linear"``;
    other 1-D weights (batch/layer norm scales) → ``"norm"``; else ``"other"``.
    """
    if name.endswith("bias"):
        return "bias"
    if len(shape) >= 3:
        return "conv"
    if len(shape) == 2:
        return "linear"
    if len(shape) == 1:
        return "norm"
    return "other"


def _check_magnitudes(name: str, values: np.ndarray, ndim: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return values


def temporal_features(history: np.ndarray) -> np.ndarray:
    """Temporal features per group from recent update magnitudes (seed eq. 4).

    Steps:

    1. A zero entry means "unknown" (the group was not sent that round); only
       positive entries count below.
    2. Each round (row) is divided by its mean over known groups, so the
       features are relative magnitudes, free of the overall update scale
       (which shrinks with the learning rate and over training).
    3. ``r = log(1 + relative magnitude)`` tames the heavy tail across layers.
    4. Per group: ``latest`` = ``r`` of the most recent known round (the
       seed's ``g_i``), ``mean`` and ``variance`` = mean and population
       variance of ``r`` over its known rounds (``Var(g_i)``). A group never
       known gets zeros.

    Parameters
    ----------
    history : np.ndarray
        Shape ``(H, n)``: per-group update magnitudes (e.g. RMS of each group's
        update) over the last ``H`` rounds, oldest first; zeros where unknown.

    Returns
    -------
    np.ndarray
        Shape ``(n, 3)``, float32, columns :data:`TEMPORAL_FEATURES`.
    """
    history = _check_magnitudes("history", history, 2)
    known = history > 0
    count = known.sum(axis=1, keepdims=True)
    row_mean = np.divide(
        history.sum(axis=1, keepdims=True),
        count,
        out=np.ones_like(count, dtype=np.float64),
        where=count > 0,
    )
    r = np.log1p(history / row_mean)
    per_group = known.sum(axis=0)
    seen = per_group > 0
    n_known = np.maximum(per_group, 1)
    mean = r.sum(axis=0) / n_known
    variance = np.where(known, (r - mean) ** 2, 0.0).sum(axis=0) / n_known
    # the last known row per group: argmax over the reversed known mask
    last = history.shape[0] - 1 - np.argmax(known[::-1], axis=0)
    latest = np.where(seen, r[last, np.arange(r.shape[1])], 0.0)
    return np.stack([latest, mean, variance], axis=1).astype(np.float32)


def structural_features(
    groups: Sequence[GroupMeta], num_layers: int | None = None
) -> np.ndarray:
    """Structural features per group (the seed's structural branch).

    Columns (:data:`STRUCTURAL_FEATURES`):

    - ``depth``: ``depth / (num_layers − 1)`` in ``[0, 1]`` (0 = input side);
    - ``log10_layer_size``: ``log10`` of the tensor's element count;
    - ``relative_size``: ``size / layer_size``, the share of its tensor the
      group covers;
    - ``density``: fraction of nonzero parameters (:attr:`GroupMeta.density`);
    - one-hot layer kind over :data:`KINDS` (all zeros for another kind).

    Parameters
    ----------
    groups : Sequence[GroupMeta]
        The ``n`` groups, in the order the scores will be used.
    num_layers : int, optional
        Number of layers in the model; by default ``1 + max depth`` of
        ``groups``.

    Returns
    -------
    np.ndarray
        Shape ``(n, 8)``, float32.
    """
    if not groups:
        return np.zeros((0, len(STRUCTURAL_FEATURES)), dtype=np.float32)
    max_depth = max(g.depth for g in groups)
    if num_layers is None:
        num_layers = max_depth + 1
    if num_layers <= max_depth:
        raise ValueError(
            f"num_layers must exceed every group's depth, got {num_layers} "
            f"for depth {max_depth}"
        )
    span = max(num_layers - 1, 1)
    rows = [
        [
            g.depth / span,
            np.log10(g.layer_size),
            g.size / g.layer_size,
            g.density,
            *(float(g.kind == kind) for kind in KINDS),
        ]
        for g in groups
    ]
    return np.asarray(rows, dtype=np.float32)


class ImportancePredictor(nn.Module):
    """Two-branch importance predictor (seed eqs. 3-4).

    ``I = α·σ(W1·[latest, mean] + W2·variance + b) + (1 − α)·σ(MLP(s))``
    with ``MLP(s) = V2·tanh(V1·s + c1) + c2``. Scores lie in ``[0, 1]``.

    ``α`` is fixed, not learned: it is a buffer that travels with the
    weights, so the edge scores exactly as the cloud trained, and ``α = 0`` or
    ``1`` are clean ablations of one branch. With the defaults the module has
    4 temporal and 161 structural parameters.

    Parameters
    ----------
    alpha : float (default: 0.5)
        Weight of the temporal branch, in ``[0, 1]``.
    hidden : int (default: 16)
        Hidden width of the structural MLP.
    seed : int (default: 0)
        Seed of the initial weights (a forked RNG; the global one is untouched).
    """

    def __init__(
        self, *, alpha: float = 0.5, hidden: int = DEFAULT_HIDDEN, seed: int = 0
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # W1 over the magnitude features (latest, mean), W2 over Var (eq. 4)
            self.temporal_magnitude = nn.Linear(2, 1)
            self.temporal_variance = nn.Linear(1, 1, bias=False)
            self.structural = nn.Sequential(
                nn.Linear(len(STRUCTURAL_FEATURES), hidden),
                nn.Tanh(),
                nn.Linear(hidden, 1),
            )
        self.register_buffer("alpha", torch.tensor([alpha], dtype=torch.float32))

    def forward(self, temporal: torch.Tensor, structural: torch.Tensor) -> torch.Tensor:
        """Scores ``(n,)`` in ``[0, 1]`` from features ``(n, 3)`` and ``(n, 8)``."""
        return self.combine(
            self.temporal_attention(temporal), self.structural_attention(structural)
        )

    def temporal_attention(self, temporal: torch.Tensor) -> torch.Tensor:
        """``σ(W1·[latest, mean] + W2·variance + b)``, ``(n,)``, from ``(n, 3)``."""
        return torch.sigmoid(
            self.temporal_magnitude(temporal[:, :2])
            + self.temporal_variance(temporal[:, 2:3])
        ).squeeze(1)

    def structural_attention(self, structural: torch.Tensor) -> torch.Tensor:
        """``σ(MLP(s))``, ``(n,)``, from ``(n, 8)``."""
        return torch.sigmoid(self.structural(structural)).squeeze(1)

    def combine(self, temporal: torch.Tensor, structural: torch.Tensor) -> torch.Tensor:
        """``α·temporal + (1 − α)·structural`` of the two attentions."""
        return self.alpha * temporal + (1 - self.alpha) * structural


def _as_tensor(
    name: str, values: np.ndarray | torch.Tensor, columns: int
) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float32)
    if tensor.ndim != 2 or tensor.shape[1] != columns:
        raise ValueError(
            f"{name} must have shape (n, {columns}), got {tuple(tensor.shape)}"
        )
    # one float64 sum first: finite float32 entries cannot overflow it
    if not torch.isfinite(tensor.sum(dtype=torch.float64)):
        raise ValueError(f"{name} must be finite")
    return tensor


def predict_importance(
    predictor: ImportancePredictor,
    temporal: np.ndarray,
    structural: np.ndarray,
) -> np.ndarray:
    """Scores ``(n,)`` in ``[0, 1]`` (float64) without tracking gradients."""
    t = _as_tensor("temporal", temporal, len(TEMPORAL_FEATURES))
    s = _as_tensor("structural", structural, len(STRUCTURAL_FEATURES))
    if t.shape[0] != s.shape[0]:
        raise ValueError(
            f"temporal and structural must have as many rows, got "
            f"{t.shape[0]} and {s.shape[0]}"
        )
    with torch.no_grad():
        # the groups of one tensor share their structural features (those
        # with zeros apart): the MLP runs once per run of equal rows
        first = _run_starts(s)
        if 2 * first.numel() > s.shape[0]:
            return predictor(t, s).double().numpy()
        lengths = torch.diff(first, append=torch.tensor([s.shape[0]]))
        structural_part = predictor.structural_attention(s[first])
        return (
            predictor.combine(
                predictor.temporal_attention(t),
                structural_part.repeat_interleave(lengths),
            )
            .double()
            .numpy()
        )


def _run_starts(rows: torch.Tensor) -> torch.Tensor:
    """Indices of the rows that differ from the row before (row 0 included)."""
    if rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    differs = (rows[1:] != rows[:-1]).any(dim=1)
    return torch.cat([torch.zeros(1, dtype=torch.int64), differs.nonzero()[:, 0] + 1])


def importance_labels(
    magnitudes: np.ndarray, *, method: Literal["rank", "max"] = "rank"
) -> np.ndarray:
    """Importance labels ``(n,)`` in ``[0, 1]`` from the realized global update.

    ``magnitudes[i]`` is the size of group ``i`` in the aggregated update
    (seed eq. 8), e.g. its RMS, so that a group's size does not count. The
    seed trains on such "ground-truth importance labels" without a formula:

    - ``"rank"`` (default): ``(rank_i − 1) / (n − 1)`` with average ranks for
      ties; uniform on ``[0, 1]`` whatever the scale or tail of the updates,
      so the squared loss weighs all groups alike (one group gives 1.0);
    - ``"max"``: ``m_i / max_j m_j`` (all zeros if every ``m_i`` is 0), which
      keeps ratios but squeezes most groups near 0 under a heavy tail.
    """
    magnitudes = _check_magnitudes("magnitudes", magnitudes, 1)
    if method == "rank":
        n = magnitudes.size
        if n <= 1:
            return np.ones(n)
        from scipy.stats import rankdata  # a second to import: only when ranked

        return (rankdata(magnitudes) - 1) / (n - 1)
    if method == "max":
        top = magnitudes.max(initial=0.0)
        return magnitudes / top if top > 0 else np.zeros_like(magnitudes)
    raise ValueError(f"method must be 'rank' or 'max', got {method!r}")


def magnitude_scores(latest: np.ndarray) -> np.ndarray:
    """The ablation score: ``m_i / max_j m_j`` from the latest magnitudes ``(n,)``.

    With nothing known yet (all zeros) every group scores 1.0: no group is
    presumed unimportant before its first update.
    """
    latest = _check_magnitudes("latest", latest, 1)
    top = latest.max(initial=0.0)
    return latest / top if top > 0 else np.ones_like(latest)


def train_predictor(
    predictor: ImportancePredictor,
    temporal: np.ndarray,
    structural: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int = 200,
    lr: float = 0.02,
    batch_size: int | None = None,
    seed: int = 0,
    threads: int | None = 1,
) -> float:
    """Fit ``predictor`` to ``labels`` with Adam on the squared error, in place.

    Parameters
    ----------
    predictor : ImportancePredictor
        Trained in place (``α`` stays fixed).
    temporal, structural : np.ndarray
        Features ``(n, 3)`` and ``(n, 8)``, as the edges computed them.
    labels : np.ndarray
        Shape ``(n,)`` in ``[0, 1]`` (:func:`importance_labels`).
    steps : int (default: 200)
        Adam steps; a fresh optimizer per call.
    lr : float (default: 0.02)
        Adam learning rate.
    batch_size : int, optional
        Rows per step, drawn without replacement from a private generator
        seeded with ``seed``; by default every step uses all rows.
    seed : int (default: 0)
        Seed of the mini-batch draws (the global RNG is untouched).
    threads : int, optional (default: 1)
        torch intra-op threads while training, restored afterwards; ``None``
        keeps the current setting. A model this small gains nothing from
        more threads, and on busy cores they cost far more than they give
        (200 steps on 400 groups: 0.1 s on one thread, 5 s on two threads
        sharing two loaded cores).

    Returns
    -------
    float
        Mean squared error over all rows after the last step.
    """
    t = _as_tensor("temporal", temporal, len(TEMPORAL_FEATURES))
    s = _as_tensor("structural", structural, len(STRUCTURAL_FEATURES))
    y = torch.as_tensor(labels, dtype=torch.float32)
    n = t.shape[0]
    if s.shape[0] != n or y.shape != (n,):
        raise ValueError(
            f"temporal, structural and labels must have n rows, got "
            f"{n}, {s.shape[0]} and {tuple(y.shape)}"
        )
    if n == 0:
        raise ValueError("need at least one labelled group to train on")
    if not torch.all((y >= 0) & (y <= 1)):
        raise ValueError("labels must lie in [0, 1]")
    if steps < 0 or lr <= 0:
        raise ValueError(f"need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fit(predictor, t, s, y, steps, lr, batch_size, seed)
    finally:
        torch.set_num_threads(old_threads)


def _fit(
    predictor: ImportancePredictor,
    t: torch.Tensor,
    s: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int | None,
    seed: int,
) -> float:
    """The Adam loop of :func:`train_predictor` on checked tensors."""
    n = t.shape[0]
    generator = torch.Generator().manual_seed(seed)
    optimizer = Adam(predictor.parameters(), lr=lr)  # torch's, without dynamo
    predictor.train()
    for _ in range(steps):
        if batch_size is None or batch_size >= n:
            rows = slice(None)
        else:
            rows = torch.randperm(n, generator=generator)[:batch_size]
        optimizer.zero_grad()
        loss = torch.mean((predictor(t[rows], s[rows]) - y[rows]) ** 2)
        loss.backward()
        optimizer.step()
    predictor.eval()
    with torch.no_grad():
        return float(torch.mean((predictor(t, s) - y) ** 2))


def predictor_to_arrays(predictor: ImportancePredictor) -> dict[str, np.ndarray]:
    """Every parameter and the ``alpha`` buffer as named float32 arrays (copies)."""
    return {
        key: value.detach().cpu().numpy().astype(np.float32, copy=True)
        for key, value in predictor.state_dict().items()
    }


def predictor_from_arrays(
    arrays: Mapping[str, np.ndarray], *, hidden: int = DEFAULT_HIDDEN
) -> ImportancePredictor:
    """Build a predictor from :func:`predictor_to_arrays` output, checked first.

    Raises
    ------
    PredictorError
        On a missing or unknown key, a value that is not a numpy array, a
        dtype other than float32, a wrong shape, a non-finite value, or an
        ``alpha`` outside ``[0, 1]``; the error names the key.
    """
    predictor = ImportancePredictor(hidden=hidden)
    expected = predictor.state_dict()
    for key in arrays:
        if key not in expected:
            raise PredictorError(key, f"unknown key (expected: {sorted(expected)})")
    for key, reference in expected.items():
        if key not in arrays:
            raise PredictorError(key, "missing")
        value = arrays[key]
        if not isinstance(value, np.ndarray):
            raise PredictorError(key, f"is a {type(value).__name__}, not an ndarray")
        if value.dtype != np.float32:
            raise PredictorError(key, f"dtype {value.dtype}, expected float32")
        if value.shape != tuple(reference.shape):
            raise PredictorError(
                key, f"shape {value.shape}, expected {tuple(reference.shape)}"
            )
        if not np.all(np.isfinite(value)):
            raise PredictorError(key, "has non-finite values")
    alpha = float(arrays["alpha"][0])
    if not 0.0 <= alpha <= 1.0:
        raise PredictorError("alpha", f"must be in [0, 1], got {alpha}")
    predictor.load_state_dict(
        {key: torch.from_numpy(np.array(arrays[key])) for key in expected}
    )
    predictor.eval()
    return predictor
