"""Device → cluster → global aggregation during training (ACE-Sync, seed 004).

Pure numpy (and :mod:`tandem.clustering`); no Flower imports. The seed names
"device clustering" and "hierarchical aggregation" for cross-device
personalization without formulas. Here, each round, for the devices ``k``
that replied, with ``b_k`` the model device ``k`` trained from (its
cluster's model, or the global model), ``u_k`` its decoded update and
``ω_k`` its eq. 8 weight (:func:`~tandem.coordination.aggregation_weights`):

- device model ``θ_k = b_k + u_k``;
- cluster model ``θ_c = Σ_{k∈c} ω_k·θ_k / W_c`` with ``W_c = Σ_{k∈c} ω_k``
  (eq. 8 within the cluster);
- global model ``θ = Σ_c W_c·θ_c / Σ_c W_c`` (eq. 8 across clusters), which
  is the flat eq. 8 average ``Σ_k ω_k·θ_k / Σ_k ω_k`` of the device models
  (:func:`hierarchical_round`).

Clusters are (re-)estimated every ``every`` rounds, starting with the first,
from the devices' *signatures* ``s_k = θ_k − θ``: where each device's model
ends up relative to the new global model. In a round where every device
trained from the global model this is ``u_k − ū`` (its update minus the
weighted mean update); later it is ``(θ_c − θ) + u_k``, so devices stay with
the cluster whose model fits them. The number of clusters is the silhouette
criterion of :func:`~tandem.clustering.choose_n_clusters` (or fixed), the
labels are k-means on the signatures' directions
(:func:`~tandem.clustering.cluster_devices`). A device that has no cluster
yet (it has not replied in a clustering round) trains from the global model.

With dynamic synchronization a device may skip the round in which the
clusters are re-estimated. It keeps a cluster all the same: the estimate
takes every device seen so far, each by the model it last sent
(``θ_k = b_k + u_k`` of its last sync) relative to the new global model,
and a cluster none of whose devices replied this round starts from the
plain mean of its devices' last models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tandem.clustering import (
    DEFAULT_MIN_SILHOUETTE,
    choose_n_clusters,
    cluster_average,
    cluster_devices,
    hierarchical_aggregate,
)

__all__ = ["ClusterTracker", "HierarchicalRound", "hierarchical_round"]


@dataclass(frozen=True)
class HierarchicalRound:
    """One round's device → cluster → global aggregate.

    Attributes
    ----------
    cluster_models : np.ndarray
        Shape ``(C, d)``: ``θ_c``; zeros for a cluster without weight.
    cluster_weights : np.ndarray
        Shape ``(C,)``: ``W_c``.
    global_model : np.ndarray
        Shape ``(d,)``: ``Σ_c W_c·θ_c / Σ_c W_c``.
    """

    cluster_models: np.ndarray
    cluster_weights: np.ndarray
    global_model: np.ndarray


def hierarchical_round(
    bases: np.ndarray,
    updates: np.ndarray,
    weights: np.ndarray,
    labels: np.ndarray,
    n_clusters: int | None = None,
) -> HierarchicalRound:
    """Device models ``b_k + u_k`` → cluster models → global model (module).

    Parameters
    ----------
    bases : np.ndarray
        Shape ``(K, d)``: the model each device trained from.
    updates : np.ndarray
        Shape ``(K, d)``: the devices' (decoded) updates.
    weights : np.ndarray
        Shape ``(K,)``, non-negative, not all zero: ``ω_k`` (eq. 8).
    labels : np.ndarray
        Shape ``(K,)``: each device's cluster in ``0 .. C−1``.
    n_clusters : int, optional
        ``C``; by default ``max(labels) + 1``.
    """
    bases = np.asarray(bases, dtype=np.float64)
    updates = np.asarray(updates, dtype=np.float64)
    if bases.shape != updates.shape:
        raise ValueError(f"bases {bases.shape} and updates {updates.shape} differ")
    averages = cluster_average(bases + updates, weights, labels, n_clusters)
    return HierarchicalRound(
        cluster_models=averages.means,
        cluster_weights=averages.weights,
        global_model=hierarchical_aggregate(averages.means, averages.weights),
    )


@dataclass
class ClusterTracker:
    """Clusters and cluster models across rounds (see the module docstring).

    Attributes
    ----------
    max_clusters : int
        Largest ``k`` the silhouette criterion tries.
    clusters : int
        0: ``k`` by silhouette; ``k >= 1``: exactly ``k`` (at most the
        devices).
    every : int
        Rounds between cluster estimates (the first round is one).
    seed : int
        Seed of k-means.
    min_silhouette : float
        Threshold of :func:`~tandem.clustering.choose_n_clusters`.
    labels : dict[int, int]
        Node id → cluster.
    models : dict[int, np.ndarray]
        Cluster → flat float64 model ``θ_c``.
    estimates : int
        Cluster estimates made so far.
    latest : dict[int, np.ndarray]
        Node id → the flat model ``b_k + u_k`` of its last reply (what a
        re-estimate uses for a device that did not reply in that round).
    """

    max_clusters: int
    clusters: int = 0
    every: int = 5
    seed: int = 0
    min_silhouette: float = DEFAULT_MIN_SILHOUETTE
    labels: dict[int, int] = field(default_factory=dict)
    models: dict[int, np.ndarray] = field(default_factory=dict)
    estimates: int = 0
    latest: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_clusters < 1 or self.clusters < 0 or self.every < 1:
            raise ValueError(
                "max_clusters and every must be >= 1 and clusters >= 0, got "
                f"{self.max_clusters}, {self.every}, {self.clusters}"
            )

    @property
    def count(self) -> int:
        """Clusters in use (0 before the first estimate)."""
        return len(self.models)

    def base(self, node: int) -> np.ndarray | None:
        """The model ``node`` trains from: its cluster's, or ``None`` (global).

        With a single cluster its model is the global model, so ``None``.
        """
        if self.count < 2 or node not in self.labels:
            return None
        return self.models.get(self.labels[node])

    def due(self, round_index: int) -> bool:
        """Whether the ``round_index``-th round (from 1) re-estimates clusters."""
        return (round_index - 1) % self.every == 0

    def step(
        self,
        round_index: int,
        nodes: Sequence[int],
        bases: np.ndarray,
        updates: np.ndarray,
        weights: np.ndarray,
    ) -> dict[str, object]:
        """Fold one round's replies in; re-estimate clusters when due.

        Parameters
        ----------
        round_index : int
            The round, counted from 1.
        nodes : sequence of int
            The devices that replied, one per row.
        bases, updates, weights
            As in :func:`hierarchical_round`.

        Returns
        -------
        dict[str, object]
            ``clusters`` (in use after the round), ``reclustered``,
            ``cluster-sizes`` (devices of this round per cluster) and the
            flat ``global`` model of :func:`hierarchical_round`.
        """
        nodes = list(nodes)
        bases = np.asarray(bases, dtype=np.float64)
        updates = np.asarray(updates, dtype=np.float64)
        weights = np.asarray(weights, dtype=np.float64)
        if len(nodes) != bases.shape[0]:
            raise ValueError(f"{len(nodes)} nodes for {bases.shape[0]} rows")
        flat = hierarchical_round(
            bases, updates, weights, np.zeros(len(nodes), dtype=np.int64), 1
        )
        global_model = flat.global_model
        for i, node in enumerate(nodes):
            self.latest[node] = bases[i] + updates[i]
        reclustered = self.due(round_index) or self.count == 0
        if reclustered:
            # every device seen so far, each by its last model (this round's
            # for those that replied)
            seen = list(self.latest)
            models = np.stack([self.latest[n] for n in seen])
            labels = self._estimate(models - global_model)
            self.labels = dict(zip(seen, labels.tolist(), strict=True))
            self.models = {}
            self.estimates += 1
        known = [i for i, n in enumerate(nodes) if n in self.labels]
        sizes: list[int] = [0] * self.count if self.count else []
        if known:
            labels = np.array([self.labels[nodes[i]] for i in known], dtype=np.int64)
            count = max(self.count, int(labels.max()) + 1)
            done = hierarchical_round(
                bases[known], updates[known], weights[known], labels, count
            )
            sizes = np.bincount(labels, minlength=count).tolist()
            for c in range(count):
                if done.cluster_weights[c] > 0:
                    self.models[c] = done.cluster_models[c]
        if reclustered:  # clusters whose devices all skipped this round
            for c in set(self.labels.values()) - set(self.models):
                mine = [self.latest[n] for n, k in self.labels.items() if k == c]
                self.models[c] = np.mean(mine, axis=0)
        return {
            "clusters": self.count,
            "reclustered": reclustered,
            "cluster-sizes": sizes,
            "global": global_model,
        }

    def _estimate(self, signatures: np.ndarray) -> np.ndarray:
        k = self.clusters
        if k == 0:
            k = choose_n_clusters(
                signatures,
                self.max_clusters,
                seed=self.seed,
                min_silhouette=self.min_silhouette,
            )
        return cluster_devices(signatures, k, seed=self.seed)

    def restore(
        self, labels: Mapping[int, int], models: Mapping[int, np.ndarray]
    ) -> None:
        """Set clusters and models (a resumed run)."""
        self.labels = {int(n): int(c) for n, c in labels.items()}
        self.models = {int(c): np.asarray(m, np.float64) for c, m in models.items()}
