"""``tandem bench split-schedule``: what SimulTrain's update schedule alone costs.

SimulTrain's edge layers are not trained the way the whole model is: the
edge takes one SGD step per chunk of ``C`` micro-batches (on their mean
gradient), its gradients come back ``D`` chunks late (computed at the weights
the chunk was forwarded at, and applied to the newer ones: weight stashing),
and its learning rate is ``lr × S``. The cloud's layers take one step per
micro-batch, as in whole-model training.

This probe trains the run's model under such a schedule ``C/D/S`` in one
process, with one edge holding all the training data, exact float32
gradients, no forecast, no reconciliation, no codec and no Flower, and gives
the final test perplexity (or accuracy) per schedule. ``1/0/1`` is exactly
whole-model SGD (tested); ``S = 0`` freezes the edge layers at their
initial weights. So the gap between a schedule and ``1/0/1`` is what the
schedule costs on this model and optimizer, before anything of the transport
or of the other edges adds to it.

Example::

    tandem bench split-schedule --dataset pysource --model transformer \\
        --seeds 10 11 12 --out docs/bench/split-schedule/results.json

``--cut`` moves the cut (``--cut embed`` leaves the transformer's edge its
embeddings only); ``1/0/1`` does not depend on it. ``--edge-optimizer``,
``--edge-lr``, ``--edge-momentum`` and ``--edge-warmup`` change how the edge
steps; ``--compensation`` (DC-ASGD) and ``--predict-weights`` (SpecTrain)
correct its late gradients. With none of them the probe is as before.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tandem.config import RunConfig
from tandem.datasets import load_dataset
from tandem.options import ConfigError
from tandem.protocol.simultrain import split_run_model
from tandem.split import predicted_weights, warmed_up
from tandem.training import evaluate, token_cross_entropy

__all__ = ["Schedule", "build_parser", "main", "parse_schedule", "train_schedule"]

#: The schedules a run compares by default: whole-model SGD, a frozen edge,
#: chunks of 4 without and with one chunk of delay (SimulTrain's W = 2), the
#: token suites' edge learning rate, and steps per micro-batch one late.
DEFAULT_SCHEDULES = ("1/0/1", "1/0/0", "4/0/1", "4/1/1", "4/1/0.25", "1/1/1")


@dataclass(frozen=True)
class Schedule:
    """How the edge layers are updated.

    Attributes
    ----------
    chunk : int
        Micro-batches per edge step ``C`` (the step takes their mean gradient).
    delay : int
        Chunks the gradients come back late ``D`` (0: before the next forward).
    scale : float
        The edge's learning rate over the cloud's ``S`` (0: frozen).
    """

    chunk: int
    delay: int
    scale: float

    @property
    def label(self) -> str:
        """``C/D/S`` as written on the command line."""
        return f"{self.chunk}/{self.delay}/{self.scale:g}"


def parse_schedule(text: str) -> Schedule:
    """``"C/D/S"`` as a :class:`Schedule`.

    Raises
    ------
    ValueError
        If the text is not three fields, ``C < 1``, ``D < 0`` or ``S < 0``.
    """
    parts = text.split("/")
    if len(parts) != 3:
        raise ValueError(f"a schedule is CHUNK/DELAY/SCALE, e.g. 4/1/0.25: {text!r}")
    try:
        chunk, delay, scale = int(parts[0]), int(parts[1]), float(parts[2])
    except ValueError:
        raise ValueError(
            f"a schedule is CHUNK/DELAY/SCALE of numbers, e.g. 4/1/0.25: {text!r}"
        ) from None
    if chunk < 1 or delay < 0 or not scale >= 0:
        raise ValueError(f"need CHUNK >= 1, DELAY >= 0 and SCALE >= 0: {text!r}")
    return Schedule(chunk, delay, scale)


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return token_cross_entropy(logits, y)


#: Optimizers the probe can give the edge layers (``--edge-optimizer``).
EDGE_OPTIMIZERS = ("sgd", "adam")


def train_schedule(
    cfg: RunConfig,
    schedule: Schedule,
    steps: int,
    seed: int,
    cut: str = "default",
    edge_optimizer: str = "sgd",
    edge_lr: float | None = None,
    compensation: float = 0.0,
    predict: bool = False,
    edge_warmup: int = 0,
    edge_momentum: float | None = None,
    cloud_optimizer: str = "sgd",
    cloud_lr: float | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Train the run's model for ``steps`` micro-batches under ``schedule``.

    Micro-batches of ``batch-size`` rows are drawn with replacement from the
    whole training split (``default_rng(seed)``); the model starts from the
    run's seed. Per micro-batch the edge forwards at its current weights
    and the cloud takes a momentum-SGD step at ``lr``; every ``C``
    micro-batches the chunk's cut gradients are queued with the weights it
    was forwarded at, and once more than ``D`` chunks are queued the oldest
    one is back-propagated at those weights and the edge takes a momentum-SGD
    step at ``lr × S`` (none when ``S = 0``). The model is cut after stage
    ``cut`` (name or index; ``"default"`` is the model's own, as for
    ``simultrain-cut``).

    The edge's optimizer can differ from the cloud's: ``edge_optimizer``
    ``"adam"`` is :class:`torch.optim.Adam` (default betas) at
    ``edge_lr × S``; ``"sgd"`` is momentum SGD at ``edge_lr × S``
    (``edge_lr`` defaults to the run's ``lr``). ``compensation`` ``λ > 0``
    corrects each late gradient for the weights having moved since its
    chunk was forwarded, as DC-ASGD does (Zheng et al., 2017, eq. 10):
    ``g + λ · g ⊙ g ⊙ (w_now − w_stash)``, the diagonal of ``g gᵀ``
    standing in for the Hessian.

    ``predict`` forwards and back-propagates each chunk at the weights its
    gradient will be applied to, as predicted from the momentum buffer ``v``
    when the chunk starts, instead of the current ones: SpecTrain's weight
    prediction (Chen et al., 2018, "Efficient and Robust Parallel DNN
    Training through Model Parallelism on Multi-GPU Platform", eq. 6),
    ``ŵ = w − s · η · v`` with ``s = D`` edge steps ahead and ``η`` the edge
    optimizer's current rate. The cloud sees the activations at ``ŵ``, and
    ``ŵ`` is the chunk's stash. Momentum SGD only; with ``D = 0`` it changes
    nothing.

    ``edge_warmup`` ``N > 0`` raises the edge's rate linearly over the first
    ``N`` micro-batches (Goyal et al., 2017, "Accurate, Large Minibatch SGD",
    §2.2, gradual warm-up): the edge step taken after micro-batch ``t``
    (1-based) runs at ``edge_lr × S × min(1, t / N)``. The cloud's rate is
    not warmed up.

    ``edge_momentum`` is the edge SGD's momentum (default: the run's); the
    cloud keeps the run's.

    Returns
    -------
    (edge, cloud) : the two parts after training.
    """
    edge, cloud = split_run_model(cfg, cut, key="--cut")
    lr, beta = cfg.train.lr, cfg.train.momentum
    cloud_rate = lr if cloud_lr is None else cloud_lr
    cloud_opt = _optimizer("cloud", cloud_optimizer, cloud, cloud_rate, beta)
    if edge_optimizer not in EDGE_OPTIMIZERS:
        raise ValueError(f"edge optimizer must be one of {EDGE_OPTIMIZERS}")
    if predict and edge_optimizer != "sgd":
        raise ValueError("weight prediction needs the sgd edge optimizer")
    if edge_warmup < 0:
        raise ValueError(f"edge warm-up must be >= 0 micro-batches: {edge_warmup}")
    edge_beta = beta if edge_momentum is None else edge_momentum
    if not 0.0 <= edge_beta < 1.0:
        raise ValueError(f"edge momentum must lie in [0, 1): {edge_beta}")
    edge_rate = (lr if edge_lr is None else edge_lr) * schedule.scale
    edge_opt = _optimizer("edge", edge_optimizer, edge, edge_rate, edge_beta)
    ahead = _predictor(edge) if predict and schedule.delay > 0 else None
    train = load_dataset(cfg.data).train  # cached: the same load as the model's
    rng = np.random.default_rng(seed)
    queue: list[tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]] = []
    xs: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    for t in range(steps):
        idx = rng.integers(0, len(train), cfg.train.batch_size)
        x, y = torch.from_numpy(train.x[idx]), torch.from_numpy(train.y[idx])
        if not xs:  # a chunk is forwarded at one version of the edge
            stash = {k: v.detach().clone() for k, v in edge.state_dict().items()}
            if ahead is not None:
                stash = _predicted(edge, edge_opt, schedule.delay, stash)
                ahead.load_state_dict(stash)
        with torch.no_grad():
            acts = edge(x) if ahead is None else ahead(x)
        acts.requires_grad_(True)
        cloud_opt.zero_grad(set_to_none=True)
        _loss(cloud(acts), y).backward()
        cloud_opt.step()
        xs.append(x)
        grads.append(acts.grad.detach())
        if len(xs) < schedule.chunk:
            continue
        queue.append((torch.cat(xs), stash, torch.cat(grads) / len(xs)))
        xs, grads = [], []
        while len(queue) > schedule.delay:
            cx, weights, g = queue.pop(0)
            if schedule.scale == 0:
                continue
            current = {k: v.detach().clone() for k, v in edge.state_dict().items()}
            edge.load_state_dict(weights)
            edge_opt.zero_grad(set_to_none=True)
            edge(cx).backward(g)
            edge.load_state_dict(current)  # the step goes to the newer weights
            if compensation > 0:
                for name, param in edge.named_parameters():
                    if param.grad is not None:
                        moved = param.detach() - weights[name]
                        param.grad.add_(compensation * param.grad * param.grad * moved)
            if edge_warmup > 0:
                for group in edge_opt.param_groups:
                    group["lr"] = warmed_up(edge_rate, t + 1, edge_warmup)
            edge_opt.step()
    return edge, cloud


def _optimizer(
    part: str, kind: str, module: torch.nn.Module, rate: float, momentum: float
) -> torch.optim.Optimizer:
    """Torch's Adam (default betas) or momentum SGD on ``module`` at ``rate``.

    Raises
    ------
    ValueError
        If ``kind`` is not one of :data:`EDGE_OPTIMIZERS` (naming ``part``).
    """
    if kind not in EDGE_OPTIMIZERS:
        raise ValueError(f"{part} optimizer must be one of {EDGE_OPTIMIZERS}")
    if kind == "adam":
        return torch.optim.Adam(module.parameters(), lr=rate)
    return torch.optim.SGD(module.parameters(), lr=rate, momentum=momentum)


def _predictor(edge: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``edge`` to forward chunks at predicted weights."""
    ahead = copy.deepcopy(edge)
    ahead.requires_grad_(False)
    return ahead


def _predicted(
    edge: torch.nn.Module,
    opt: torch.optim.Optimizer,
    delay: int,
    weights: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """SpecTrain's prediction of the edge ``delay`` steps ahead
    (:func:`~tandem.split.predicted_weights` with ``delay · η``, ``η`` the
    edge optimizer's rate, and its momentum buffers by parameter name;
    parameters without a buffer yet, before the first step, are kept)."""
    momentum = {}
    for name, param in edge.named_parameters():
        buf = opt.state.get(param, {}).get("momentum_buffer")
        if buf is not None:
            momentum[name] = buf
    return predicted_weights(weights, momentum, delay * opt.param_groups[0]["lr"])


def _measure(
    cfg: RunConfig, schedule: Schedule, steps: int, seed: int, args: argparse.Namespace
) -> dict:
    edge, cloud = train_schedule(
        cfg,
        schedule,
        steps,
        seed,
        args.cut,
        edge_optimizer=args.edge_optimizer,
        edge_lr=args.edge_lr,
        compensation=args.compensation,
        predict=args.predict_weights,
        edge_warmup=args.edge_warmup,
        edge_momentum=args.edge_momentum,
        cloud_optimizer=args.cloud_optimizer,
        cloud_lr=args.cloud_lr,
    )
    model = torch.nn.Sequential(edge, cloud)
    stats = evaluate(model, load_dataset(cfg.data).test, torch.device("cpu"))
    return {
        "seed": seed,
        "loss": stats.loss,
        "perplexity": math.exp(stats.loss),
        "accuracy": stats.accuracy,
    }


def build_parser() -> argparse.ArgumentParser:
    """The options of ``tandem bench split-schedule``."""
    parser = argparse.ArgumentParser(
        prog="tandem bench split-schedule",
        description=(
            "Train the run's model under SimulTrain's edge update schedules "
            "(CHUNK/DELAY/SCALE) in one process, without Flower, and compare "
            "them with whole-model SGD (1/0/1)."
        ),
    )
    parser.add_argument("--dataset", default="pysource")
    parser.add_argument("--model", default="auto")
    parser.add_argument("--data-path", default="")
    parser.add_argument(
        "--cut",
        default="default",
        help="stage the edge ends at, by name or index (default: the model's)",
    )
    parser.add_argument("--steps", type=int, default=300, help="micro-batches")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument(
        "--edge-optimizer",
        choices=EDGE_OPTIMIZERS,
        default="sgd",
        help="the edge layers' optimizer; the cloud's is momentum SGD "
        "(1/0/1 with sgd is whole-model SGD)",
    )
    parser.add_argument(
        "--cloud-optimizer",
        choices=EDGE_OPTIMIZERS,
        default="sgd",
        help="the cloud layers' optimizer (1/0/1 with adam on both: whole-model Adam)",
    )
    parser.add_argument(
        "--cloud-lr",
        type=float,
        help="the cloud optimizer's rate (default: --lr)",
    )
    parser.add_argument(
        "--edge-lr",
        type=float,
        help="the edge optimizer's rate before the schedule's scale S (default: --lr)",
    )
    parser.add_argument(
        "--compensation",
        type=float,
        default=0.0,
        help="DC-ASGD's lambda for late edge gradients (0: none)",
    )
    parser.add_argument(
        "--predict-weights",
        action="store_true",
        help="forward and back-propagate each chunk at the edge weights "
        "predicted D steps ahead, w - D * lr * v (SpecTrain)",
    )
    parser.add_argument(
        "--edge-warmup",
        type=int,
        default=0,
        metavar="N",
        help="raise the edge's rate linearly over the first N micro-batches (0: none)",
    )
    parser.add_argument(
        "--edge-momentum",
        type=float,
        help="the edge SGD's momentum (default: --momentum)",
    )
    parser.add_argument("--text-test-windows", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12])
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=list(DEFAULT_SCHEDULES),
        metavar="C/D/S",
        help="edge schedules: chunk, delay in chunks, edge lr scale "
        f"(default: {' '.join(DEFAULT_SCHEDULES)})",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tandem bench split-schedule``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        schedules = [parse_schedule(s) for s in args.schedules]
    except ValueError as err:
        parser.error(str(err))
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.edge_lr is not None and not args.edge_lr > 0:
        parser.error(f"--edge-lr must be > 0, got {args.edge_lr}")
    if not args.compensation >= 0:
        parser.error(f"--compensation must be >= 0, got {args.compensation}")
    if args.edge_warmup < 0:
        parser.error(f"--edge-warmup must be >= 0, got {args.edge_warmup}")
    if args.edge_momentum is not None and not 0.0 <= args.edge_momentum < 1.0:
        parser.error(f"--edge-momentum must lie in [0, 1), got {args.edge_momentum}")
    if args.predict_weights and args.edge_optimizer != "sgd":
        parser.error("--predict-weights needs --edge-optimizer sgd")
    torch.set_num_threads(1)
    rows = {}
    for schedule in schedules:
        runs = []
        for seed in args.seeds:
            cfg = RunConfig.from_flat(
                {
                    "dataset": args.dataset,
                    "data-path": args.data_path,
                    "model": args.model,
                    "batch-size": args.batch_size,
                    "lr": args.lr,
                    "momentum": args.momentum,
                    "text-test-windows": args.text_test_windows,
                    "seed": seed,
                }
            )
            try:
                runs.append(_measure(cfg, schedule, args.steps, seed, args))
            except ConfigError as err:
                parser.error(str(err))
        rows[schedule.label] = runs
    whole = rows.get("1/0/1")
    print("| schedule C/D/S | perplexity | accuracy | perplexity / 1/0/1 |")
    print("|---|---|---|---|")
    for label, runs in rows.items():
        ppl = [r["perplexity"] for r in runs]
        acc = [r["accuracy"] for r in runs]
        ratio = "–"
        if whole is not None:
            paired = [
                r["perplexity"] / w["perplexity"]
                for r, w in zip(runs, whole, strict=True)
            ]
            ratio = f"{statistics.mean(paired):.3f}x"
        sd = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        print(
            f"| {label} | {statistics.mean(ppl):.3f} ± {sd:.3f} | "
            f"{100 * statistics.mean(acc):.2f}% | {ratio} |"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": vars(args) | {"out": str(args.out)}, "runs": rows}
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"results: {args.out}")
    return 0
