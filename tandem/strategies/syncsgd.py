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

What travels is the whole model both ways each step (the seeds' table: 75 KB
up and down); the edge uploads its updated weights rather than the gradient,
which has the same size and lets Flower's strategy do the averaging.
"""

from __future__ import annotations

from tandem.server_context import ServerRun
from tandem.strategies.fedavg import CheckedFedAvgM
from tandem.strategies.fedavg import run as run_fedavg

__all__ = ["run"]


def run(srv: ServerRun) -> None:
    """``num-server-rounds`` synchronous momentum-SGD steps."""
    run_fedavg(
        srv,
        CheckedFedAvgM,
        local_steps=1,
        server_learning_rate=1.0,
        server_momentum=srv.cfg.train.momentum,
    )
