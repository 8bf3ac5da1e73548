"""Small splittable models.

Every model is an :class:`torch.nn.Sequential` with named stages, so it can be
cut at a stage boundary into an edge part ``f_e`` and a cloud part ``f_c``
(SimulTrain). Each carries a named default cut in :data:`DEFAULT_CUTS`.

=========  ==========================  ===========================  ===========
name       for                         parameters (MNIST-1D / 28px)  default cut
=========  ==========================  ===========================  ===========
cnn1d      MNIST-1D, sensor windows    9,610 (1x40, 10 classes)      ``act1``
cnn2d      28/32-px images             ~ 26k (1x28x28)               ``pool2``
mlp        anything (flattened)        ~ 13k (1x40)                  ``act1``
resnet18   CIFAR-sized images          ~ 11.2M (3x32x32)             ``layer2``
=========  ==========================  ===========================  ===========
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from tandem.config import ConfigError

__all__ = ["DEFAULT_CUTS", "build_model", "default_model_for", "resolve_device"]

DEFAULT_CUTS = {
    "cnn1d": "act1",
    "cnn2d": "pool2",
    "mlp": "act1",
    "resnet18": "layer2",
}


def default_model_for(input_shape: tuple[int, ...]) -> str:
    """The model ``model=auto`` picks: ``cnn1d`` for (C, L), ``cnn2d`` for (C, H, W)."""
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


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0
) -> nn.Sequential:
    """Build model ``name`` for inputs of ``input_shape`` (channels first).

    Weights are initialised from a private generator seeded with ``seed``, so
    every node and the server build the same initial model without touching
    torch's global RNG.

    Raises
    ------
    ConfigError
        If the model does not fit the input (e.g. ``cnn2d`` on 1-D signals).
    """
    if name == "auto":
        name = default_model_for(input_shape)
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        if name == "cnn1d":
            if len(input_shape) != 2:
                raise ConfigError(
                    "model", name, f"needs (C, L) inputs, got {input_shape}"
                )
            model = cnn1d(input_shape[0], input_shape[1], num_classes)
        elif name == "cnn2d":
            if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
                raise ConfigError(
                    "model", name, f"needs square (C, H, W) inputs, got {input_shape}"
                )
            model = cnn2d(input_shape[0], input_shape[1], num_classes)
        elif name == "mlp":
            model = mlp(math.prod(input_shape), num_classes)
        elif name == "resnet18":
            if len(input_shape) != 3:
                raise ConfigError(
                    "model", name, f"needs (C, H, W) inputs, got {input_shape}"
                )
            model = resnet18(input_shape[0], num_classes)
        else:
            raise ConfigError(
                "model", name, f"must be one of auto, {', '.join(DEFAULT_CUTS)}"
            )
    return model


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
