"""SyncSGD, cloud side: one synchronous SGD step per exchange (the seeds' baseline).

Each step every edge downloads the current weights, computes the gradient of
one mini-batch, and uploads the result; the cloud averages and steps with
heavy-ball momentum; then the next step starts. Built from Flower's own
:class:`~flwr.serverapp.strategy.FedAvgM` (Hsu et al. 2019,
https://arxiv.org/abs/1909.06335) with **one local step** per round and
server momentum ``μ`` = the run's ``momentum``: with one plain SGD step at
learning rate ``η`` on node ``k``, the pseudo-gradient is
``θ − Σ_k (n_k/n) θ_k = η·ḡ`` (the example-weighted mean gradient), and
FedAvgM's ``v ← μ·v + η·ḡ``, ``θ ← θ − v`` is momentum SGD on ``ḡ``: the
same update as the centralized baseline with a K-times larger batch.

With ``optimizer = "adam"`` the cloud steps with Flower's
:class:`~flwr.serverapp.strategy.FedAdam` instead (Reddi et al., 2021): on the
pseudo-gradient ``Δ = −η·ḡ`` of the same one plain SGD step per node, its
``m ← β₁·m + (1 − β₁)·Δ``, ``v ← β₂·v + (1 − β₂)·Δ²``,
``θ ← θ + η_t·m / (√v + τ)`` with ``η`` = ``lr``, betas (0.9, 0.999) and
``τ = 10⁻⁸·η`` is Adam on ``ḡ`` (``ε = 10⁻⁸``, up to where ``τ`` enters),
except that FedAdam's bias correction counts from 2 (``η_t = η·√(1 −
β₂^(t+1)) / (1 − β₁^(t+1))`` in round ``t``), which changes the first few
steps' size (round 1: 0.74× Adam's).

What travels is the whole model both ways each step (the seeds' table: 75 KB
up and down); the edge uploads its updated weights rather than the gradient,
which has the same size and lets Flower's strategy do the averaging.
"""

from __future__ import annotations

from tandem.server_context import ServerRun
from tandem.strategies.fedavg import CheckedFedAdam, CheckedFedAvgM
from tandem.strategies.fedavg import run as run_fedavg

__all__ = ["run"]


def run(srv: ServerRun) -> None:
    """``num-server-rounds`` synchronous momentum-SGD (or Adam) steps."""
    train = srv.cfg.train
    if train.optimizer == "adam":
        run_fedavg(
            srv,
            CheckedFedAdam,
            local_steps=1,
            eta=train.lr,
            eta_l=train.lr,
            beta_1=0.9,
            beta_2=0.999,
            tau=1e-8 * train.lr,
        )
        return
    run_fedavg(
        srv,
        CheckedFedAvgM,
        local_steps=1,
        server_learning_rate=1.0,
        server_momentum=srv.cfg.train.momentum,
    )
