"""Small splittable models, by name: the :data:`MODELS` registry.

Every model is an :class:`torch.nn.Sequential` with named stages, so it can be
cut at a stage boundary into an edge part ``f_e`` and a cloud part ``f_c``
(SimulTrain). Each registry entry is a builder ``(input_shape, num_classes) ->
nn.Sequential`` (raising :class:`~tandem.options.ConfigError` for inputs it does
not fit) and its named default cut. Adding a model is one builder and one line
in :data:`MODELS`; the run config's ``model`` choices are its keys (and
``auto``).

===========  ============================  ===========================  ===========
name         for                           parameters (MNIST-1D / 28px)  default cut
===========  ============================  ===========================  ===========
cnn1d        MNIST-1D, sensor windows      9,610 (1x40, 10 classes)      ``act1``
cnn2d        28/32-px images               ~ 26k (1x28x28)               ``pool2``
mlp          anything (flattened)          ~ 13k (1x40)                  ``act1``
resnet18     CIFAR-sized images            ~ 11.2M (3x32x32)             ``layer2``
transformer  byte tokens (pysource, text)  867,328 (vocab 256, T = 64)   ``block1``
===========  ============================  ===========================  ===========

``transformer`` (:mod:`tandem.transformer`) is a decoder-only language model
for token data (``DataBundle.tokens``): ``(B, T)`` ids in, ``(B, T, vocab)``
logits out; its default cut after the embedding and the first block sends
``(B, T, 128)`` activations from the edge. ``model="auto"`` picks it for
token data.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tandem.options import ConfigError, registered

__all__ = [
    "DEFAULT_CUTS",
    "MODELS",
    "ModelEntry",
    "build_model",
    "default_model_for",
    "model_entry",
    "resolve_device",
]


def default_model_for(input_shape: tuple[int, ...], tokens: bool = False) -> str:
    """The model ``model=auto`` picks: ``transformer`` for token ids, ``cnn1d``
    for (C, L), ``cnn2d`` for (C, H, W), else ``mlp``."""
    if tokens:
        return "transformer"
    if len(input_shape) == 2:
        return "cnn1d"
    if len(input_shape) == 3:
        return "cnn2d"
    return "mlp"


def cnn1d(
    in_channels: int, length: int, num_classes: int, width: int = 32
) -> nn.Sequential:
    """A three-layer 1-D CNN: two stride-2 convolutions shrink length by 4."""
    out_len = math.ceil(math.ceil(length / 2) / 2)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv1d(in_channels, width, 5, padding=2),
            act1=nn.ReLU(),
            conv2=nn.Conv1d(width, width, 3, stride=2, padding=1),
            act2=nn.ReLU(),
            conv3=nn.Conv1d(width, width, 3, stride=2, padding=1),
            act3=nn.ReLU(),
            flatten=nn.Flatten(),
            fc=nn.Linear(width * out_len, num_classes),
        )
    )


def cnn2d(in_channels: int, size: int, num_classes: int) -> nn.Sequential:
    """Two conv + max-pool blocks and a small classifier, for 28 or 32 px."""
    feat = size // 4
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, 16, 3, padding=1),
            act1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            act2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(32 * feat * feat, 64),
            act3=nn.ReLU(),
            fc2=nn.Linear(64, num_classes),
        )
    )


def mlp(in_features: int, num_classes: int, hidden: int = 256) -> nn.Sequential:
    """A two-hidden-layer perceptron over the flattened input."""
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(in_features, hidden),
            act1=nn.ReLU(),
            fc2=nn.Linear(hidden, hidden // 2),
            act2=nn.ReLU(),
            fc3=nn.Linear(hidden // 2, num_classes),
        )
    )


def resnet18(in_channels: int, num_classes: int) -> nn.Sequential:
    """torchvision's ResNet-18 with a CIFAR-sized stem, as named stages.

    The 7x7/stride-2 stem and max-pool are replaced by a 3x3/stride-1 conv (as
    in He et al. 2016, Sec. 4.2 for CIFAR), so 32-px inputs keep their
    resolution into ``layer1``. Stages: ``stem``, ``layer1`` ... ``layer4``,
    ``pool``, ``flatten``, ``fc``; every stage boundary is a valid cut.
    """
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None, num_classes=num_classes)
    stem = nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
        net.bn1,
        net.relu,
    )
    return nn.Sequential(
        OrderedDict(
            stem=stem,
            layer1=net.layer1,
            layer2=net.layer2,
            layer3=net.layer3,
            layer4=net.layer4,
            pool=net.avgpool,
            flatten=nn.Flatten(),
            fc=net.fc,
        )
    )


def _fits(name: str, ok: bool, needs: str, input_shape: tuple[int, ...]) -> None:
    if not ok:
        raise ConfigError("model", name, f"needs {needs} inputs, got {input_shape}")


def _cnn1d(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    _fits("cnn1d", len(input_shape) == 2, "(C, L)", input_shape)
    return cnn1d(input_shape[0], input_shape[1], num_classes)


def _cnn2d(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    square = len(input_shape) == 3 and input_shape[1] == input_shape[2]
    _fits("cnn2d", square, "square (C, H, W)", input_shape)
    return cnn2d(input_shape[0], input_shape[1], num_classes)


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    return mlp(math.prod(input_shape), num_classes)


def _resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    _fits("resnet18", len(input_shape) == 3, "(C, H, W)", input_shape)
    return resnet18(input_shape[0], num_classes)


def _transformer(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    from tandem.transformer import transformer

    _fits("transformer", len(input_shape) == 1, "(T,) token", input_shape)
    return transformer(vocab=num_classes, context=input_shape[0])


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder and the stage SimulTrain cuts after."""

    build: Callable[[tuple[int, ...], int], nn.Sequential]
    default_cut: str


#: Model name -> builder and default cut.
MODELS: dict[str, ModelEntry] = {
    "cnn1d": ModelEntry(_cnn1d, "act1"),
    "cnn2d": ModelEntry(_cnn2d, "pool2"),
    "mlp": ModelEntry(_mlp, "act1"),
    "resnet18": ModelEntry(_resnet18, "layer2"),
    "transformer": ModelEntry(_transformer, "block1"),
}
#: Model name -> default cut (read from :data:`MODELS`).
DEFAULT_CUTS = {name: entry.default_cut for name, entry in MODELS.items()}


def model_entry(name: str) -> ModelEntry:
    """The model registered as ``name``.

    Raises
    ------
    ConfigError
        Naming ``model`` and the registered names, if ``name`` is not one.
    """
    return registered(MODELS, "model", name, also=("auto",))


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int = 0,
    *,
    tokens: bool = False,
) -> nn.Sequential:
    """Build model ``name`` (or the ``auto`` pick) for inputs of ``input_shape``.

    Inputs are channels first; ``tokens`` says they are token ids (``auto``
    then picks the transformer). Weights are initialised from a private generator
    seeded with ``seed``, so every node and the server build the same initial
    model without touching torch's global RNG.

    Raises
    ------
    ConfigError
        If ``name`` is not registered, or the model does not fit the input
        (e.g. ``cnn2d`` on 1-D signals).
    """
    if name == "auto":
        name = default_model_for(input_shape, tokens)
    entry = model_entry(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.build(input_shape, num_classes)


def resolve_device(spec: str, key: str = "device") -> torch.device:
    """Turn a run-config device (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a device.

    ``auto`` picks CUDA when it is available, else the CPU.

    Raises
    ------
    ConfigError
        If CUDA is asked for but not available.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(key, spec, "CUDA is not available on this machine")
    return torch.device(spec)
