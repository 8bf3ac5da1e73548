"""tandem's optimizers: torch's SGD and Adam steps, bit for bit, without
importing ``torch._dynamo``."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from tandem.optim import Adam, MomentumSGD
from tandem.training import make_optimizer


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Linear(3, 2))


def _run(model: nn.Module, optimizer, steps: int, frozen_after: int = 99) -> None:
    """``steps`` steps on fixed random batches; from step ``frozen_after`` the
    last layer gets no gradient (a parameter without one must be skipped and
    keep its state)."""
    generator = torch.Generator().manual_seed(3)
    for step in range(steps):
        x = torch.randn(8, 5, generator=generator)
        y = torch.randint(0, 2, (8,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        last = model[3]
        for p in last.parameters():
            p.requires_grad_(step < frozen_after)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_momentum_sgd_equals_torch_sgd_bit_for_bit(momentum: float):
    ours, theirs = _model(0), _model(0)
    a = MomentumSGD(ours.parameters(), lr=0.1, momentum=momentum)
    b = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=momentum)
    _run(ours, a, 12, frozen_after=5)
    _run(theirs, b, 12, frozen_after=5)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q), name
        if momentum:
            assert torch.equal(
                a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"]
            ), name
        else:
            assert p not in a.state  # plain SGD keeps no buffer
    # the weights moved, and the frozen layer stopped at step 5
    assert not torch.equal(next(ours.parameters()), next(_model(0).parameters()))


def test_momentum_sgd_is_the_heavy_ball_formula_by_hand():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = MomentumSGD([w], lr=0.5, momentum=0.9)
    w.grad = torch.tensor([0.2, 0.4])
    opt.step()  # v = g = (0.2, 0.4); w = (1 - 0.1, -2 - 0.2)
    assert torch.allclose(w, torch.tensor([0.9, -2.2]))
    w.grad = torch.tensor([1.0, 0.0])
    opt.step()  # v = 0.9 v + g = (1.18, 0.36); w -= 0.5 v
    assert torch.allclose(w, torch.tensor([0.9 - 0.59, -2.2 - 0.18]))
    assert torch.allclose(opt.state[w]["momentum_buffer"], torch.tensor([1.18, 0.36]))


def test_adam_equals_torch_adam_bit_for_bit():
    ours, theirs = _model(1), _model(1)
    a = Adam(ours.parameters(), lr=0.01)
    b = torch.optim.Adam(theirs.parameters(), lr=0.01)
    _run(ours, a, 15, frozen_after=7)
    _run(theirs, b, 15, frozen_after=7)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q), name
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a.state[p][key], b.state[q][key]), (name, key)
    assert float(a.state[ours[3].weight]["step"]) == 7.0  # no steps once frozen


def test_adam_first_step_by_hand():
    # step 1: m = (1-β1) g, v = (1-β2) g², bias-corrected m̂ = g, v̂ = g²,
    # so w -= lr · g / (|g| + eps) = lr · sign(g) (up to eps)
    w = nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    opt = Adam([w], lr=0.1)
    w.grad = torch.tensor([3.0, -0.5, 0.0])
    opt.step()
    assert torch.allclose(w, torch.tensor([0.9, 1.1, 1.0]), atol=1e-6)


def test_zero_grad_and_deepcopy_keep_the_pairing():
    model = _model(2)
    opt = make_optimizer(model, 0.05, 0.9)
    assert isinstance(opt, MomentumSGD)
    _run(model, opt, 3)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert q in twin_opt.state and q is not p  # the buffers follow the copy
        assert torch.equal(
            twin_opt.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"]
        )
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_the_run_optimizer_is_torchs_adam_or_momentum_sgd():
    for kind, reference in (
        ("adam", lambda ps: torch.optim.Adam(ps, lr=0.01)),
        ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)),
    ):
        ours, theirs = _model(4), _model(4)
        opt = make_optimizer(ours, 0.01, 0.9, kind)
        assert isinstance(opt, Adam if kind == "adam" else MomentumSGD)
        _run(ours, opt, 5)
        _run(theirs, reference(list(theirs.parameters())), 5)
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(p, q), kind
    with pytest.raises(ValueError, match="'sgd' or 'adam'"):
        make_optimizer(_model(0), 0.01, 0.9, "rmsprop")


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda ps: MomentumSGD(ps, lr=-1.0), "learning rate"),
        (lambda ps: MomentumSGD(ps, lr=0.1, momentum=-0.5), "momentum"),
        (lambda ps: MomentumSGD([], lr=0.1), "empty parameter list"),
        (lambda ps: Adam(ps, lr=0.1, betas=(1.0, 0.9)), "betas"),
        (lambda ps: Adam(ps, lr=float("nan")), "learning rate"),
    ],
)
def test_bad_settings_are_refused(make, error):
    with pytest.raises(ValueError, match=error):
        make(list(_model(0).parameters()))


def _in_a_fresh_process(code: str) -> str:
    """What ``code`` prints, run by a fresh interpreter (nothing imported yet)."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_no_dynamo_import():
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from tandem.optim import Adam\n"
        "from tandem.training import make_optimizer\n"
        "m = nn.Linear(3, 2)\n"
        "for opt in (make_optimizer(m, 0.1, 0.9), Adam(m.parameters())):\n"
        "    m(torch.ones(1, 3)).sum().backward()\n"
        "    opt.step()\n"
        "    opt.zero_grad()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    assert _in_a_fresh_process(code) == "False"
