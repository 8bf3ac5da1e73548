"""torch's SGD and Adam steps without ``torch.optim.Optimizer``.

The first ``torch.optim.Optimizer`` a process builds (and its first
``step``) imports ``torch._dynamo``: about 2 s of CPU on a quiet core, 4 s
when two processes start at once on two cores. Every
simulation worker and every ServerApp paid it once per run, and on the
deployment engine every message starts a fresh ClientApp process that paid
it again. These classes call the same functional steps the torch optimizers
call (:func:`torch.optim.sgd.sgd`, :func:`torch.optim.adam.adam`), which do
not import it, with the same state, so the weights they produce are
bit for bit those of :class:`torch.optim.SGD` and :class:`torch.optim.Adam`
(tests check both). Only the options tandem uses are offered: one parameter
group, no weight decay, no Nesterov, no AMSGrad.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch.optim.adam import adam
from torch.optim.sgd import sgd

__all__ = ["Adam", "MomentumSGD", "adam_", "adam_state", "momentum_sgd_"]


def momentum_sgd_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    buffers: list[torch.Tensor | None],
    lr: float,
    momentum: float,
) -> None:
    """One step of :class:`torch.optim.SGD` in place (its functional step,
    :func:`torch.optim.sgd.sgd`): ``v ← β·v + g`` (``v = g`` where the
    buffer is None, and stored in ``buffers``), ``θ ← θ − lr·v``; no
    dampening, no Nesterov, no weight decay. ``momentum = 0`` is plain SGD
    and leaves ``buffers`` as they are."""
    sgd(
        params,
        grads,
        buffers,
        weight_decay=0.0,
        momentum=momentum,
        lr=lr,
        dampening=0.0,
        nesterov=False,
        maximize=False,
    )


def _scalar_dtype() -> torch.dtype:
    """The dtype torch keeps Adam's step count in (float64 only when that is
    the default dtype)."""
    return (
        torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    )


def adam_state(param: torch.Tensor) -> dict[str, torch.Tensor]:
    """A parameter's Adam state before its first step, as
    :class:`torch.optim.Adam` makes it: ``step`` 0 (a CPU scalar tensor),
    ``exp_avg`` and ``exp_avg_sq`` zeros like ``param``."""
    return {
        "step": torch.tensor(0.0, dtype=_scalar_dtype()),
        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
    }


def adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """One step of :class:`torch.optim.Adam` in place (its functional step,
    :func:`torch.optim.adam.adam`): per parameter ``t ← t + 1``,
    ``m ← β1·m + (1 − β1)·g``, ``v ← β2·v + (1 − β2)·g²``,
    ``θ ← θ − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + eps)``; no weight
    decay, no AMSGrad. ``states`` are the parameters' :func:`adam_state`
    dicts, updated in place."""
    adam(
        params,
        grads,
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [],
        [s["step"] for s in states],
        amsgrad=False,
        has_complex=any(torch.is_complex(p) for p in params),
        beta1=betas[0],
        beta2=betas[1],
        lr=lr,
        weight_decay=0.0,
        eps=eps,
        maximize=False,
    )


class _Stepper:
    """What the two optimizers share: the parameters, ``state[p]`` as in
    torch (a dict per parameter, empty until its first step), and
    ``zero_grad``."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float) -> None:
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("the optimizer got an empty parameter list")
        if not lr >= 0.0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        self.lr = float(lr)
        self.state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(
            dict
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) every parameter's gradient, as torch's optimizers do."""
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().requires_grad_(False)
                p.grad.zero_()

    def _with_grad(self) -> list[torch.Tensor]:
        """The parameters that have a gradient (torch skips the others)."""
        return [p for p in self.params if p.grad is not None]


class MomentumSGD(_Stepper):
    """:class:`torch.optim.SGD` with heavy-ball momentum, the optimizer of
    every method: ``v ← β·v + g`` (``v = g`` at a parameter's first step),
    ``θ ← θ − lr·v``; ``β = 0`` is plain SGD, ``θ ← θ − lr·g``.

    ``state[p]["momentum_buffer"]`` is ``v``, as in torch.
    """

    def __init__(
        self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0
    ) -> None:
        super().__init__(params, lr)
        if not momentum >= 0.0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        self.momentum = float(momentum)

    @torch.no_grad()
    def step(self) -> None:
        """One step on the parameters' current gradients."""
        params = self._with_grad()
        buffers: list[torch.Tensor | None] = [
            self.state.get(p, {}).get("momentum_buffer") for p in params
        ]
        grads = [p.grad for p in params]
        momentum_sgd_(params, grads, buffers, self.lr, self.momentum)  # type: ignore[arg-type]
        if self.momentum != 0.0:
            for p, buffer in zip(params, buffers, strict=True):
                self.state[p]["momentum_buffer"] = buffer  # type: ignore[assignment]


class Adam(_Stepper):
    """:class:`torch.optim.Adam` (Kingma & Ba, 2015, Algorithm 1) with
    ``betas`` and ``eps``; ``state[p]`` holds ``step``, ``exp_avg`` and
    ``exp_avg_sq`` as in torch."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, lr)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)

    @torch.no_grad()
    def step(self) -> None:
        """One step on the parameters' current gradients."""
        params = self._with_grad()
        for p in params:
            if not self.state.get(p):  # torch's lazy state, with the step on the CPU
                self.state[p] = adam_state(p)
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        adam_(params, grads, states, self.lr, self.betas, self.eps)  # type: ignore[arg-type]
