"""Models: shapes, default cuts, seeded init, devices."""

from __future__ import annotations

import pytest
import torch

from tandem.config import ConfigError
from tandem.models import DEFAULT_CUTS, build_model, resolve_device

CASES = [
    ("cnn1d", (1, 40)),
    ("cnn1d", (3, 200)),
    ("cnn2d", (1, 28, 28)),
    ("cnn2d", (3, 32, 32)),
    ("mlp", (1, 40)),
    ("resnet18", (3, 32, 32)),
]


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_forward_shape_and_default_cut(name, shape):
    model = build_model(name, shape, num_classes=6)
    out = model(torch.zeros(2, *shape))
    assert out.shape == (2, 6)
    names = [n for n, _ in model.named_children()]
    cut = names.index(DEFAULT_CUTS[name])
    assert 0 <= cut < len(names) - 1  # both sides of the cut are non-empty
    # running the two halves in sequence equals running the whole model
    model.eval()
    x = torch.randn(2, *shape)
    edge, cloud = model[: cut + 1], model[cut + 1 :]
    torch.testing.assert_close(cloud(edge(x)), model(x))


def test_cnn1d_is_the_10k_parameter_default():
    model = build_model("auto", (1, 40), 10)
    assert next(n for n, _ in model.named_children()) == "conv1"
    assert sum(p.numel() for p in model.parameters()) == 9610


def test_seeded_init_is_reproducible_and_private():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = build_model("cnn1d", (1, 40), 10, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model("cnn1d", (1, 40), 10, seed=3)
    c = build_model("cnn1d", (1, 40), 10, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_model_that_does_not_fit_the_input_is_a_config_error():
    with pytest.raises(ConfigError, match="model"):
        build_model("cnn2d", (1, 40), 10)
    with pytest.raises(ConfigError, match="model"):
        build_model("cnn1d", (1, 28, 28), 10)


def test_auto_device_without_cuda_is_cpu():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="edge-device"):
            resolve_device("cuda", "edge-device")
