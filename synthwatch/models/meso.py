"""Meso-4 and MesoInception-4 face-forgery detectors, reimplemented in torch.

Architecture from Afchar, Nozick, Yamagishi, Echizen, "MesoNet: a Compact Facial Video
Forgery Detection Network", WIFS 2018 (arXiv:1809.00888), and the authors' Keras code
(github.com/DariusAf/MesoNet, Apache-2.0, classifiers.py @2144d56). This is our own torch
code written from that description; only the published weights are reused, converted by
`synthwatch.models.keras_h5`.

Both modules take float32 NCHW RGB in [0, 1], 256x256, and return the *fake* score
``1 - P(real)`` of shape (N,). The upstream Keras model outputs P(real) (its training
classes were df=0, real=1); we flip it inside the module so every detector in synthwatch
means the same thing by "score": higher = more likely synthetic.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from synthwatch.errors import ModelUnavailable
from synthwatch.models.inputs import MESO_INPUT_SIZE
from synthwatch.models.keras_h5 import (
    MESO4_LAYERS,
    MESOINCEPTION4_LAYERS,
    KerasLayout,
    keras_state_dict,
)

INPUT_SIZE = MESO_INPUT_SIZE
"""Side of the square face crop both networks were trained on."""

# Keras BatchNormalization's default epsilon; torch's default (1e-5) would shift every
# activation slightly and the error compounds over four blocks.
_KERAS_BN_EPS = 1e-3


class _ConvBlock(nn.Module):
    """conv (same padding, bias) -> ReLU -> BatchNorm -> MaxPool, in the Keras order.

    The authors put BatchNorm *after* the ReLU; swapping them would change the outputs.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, pool: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
        self.bn = nn.BatchNorm2d(c_out, eps=_KERAS_BN_EPS)
        # Keras pools with padding="same"; every feature map here divides evenly by the
        # pool size at 256x256 input, so no padding is ever applied.
        self.pool = nn.MaxPool2d(pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.pool(self.bn(torch.relu(self.conv(x))))
        return y


class _InceptionBlock(nn.Module):
    """MesoInception layer: four parallel branches concatenated, then BatchNorm and pool 2.

    Branches, in concatenation order: [1x1], [1x1 -> 3x3], [1x1 -> 3x3 dilation 2],
    [1x1 -> 3x3 dilation 3]; every conv has a bias and is followed by ReLU.
    """

    def __init__(self, c_in: int, a: int, b: int, c: int, d: int) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(c_in, a, 1)
        self.b2_1 = nn.Conv2d(c_in, b, 1)
        self.b2_2 = nn.Conv2d(b, b, 3, padding=1)
        self.b3_1 = nn.Conv2d(c_in, c, 1)
        self.b3_2 = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.b4_1 = nn.Conv2d(c_in, d, 1)
        self.b4_2 = nn.Conv2d(d, d, 3, padding=3, dilation=3)
        self.bn = nn.BatchNorm2d(a + b + c + d, eps=_KERAS_BN_EPS)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = torch.relu(self.b1(x))
        y2 = torch.relu(self.b2_2(torch.relu(self.b2_1(x))))
        y3 = torch.relu(self.b3_2(torch.relu(self.b3_1(x))))
        y4 = torch.relu(self.b4_2(torch.relu(self.b4_1(x))))
        y: torch.Tensor = self.pool(self.bn(torch.cat([y1, y2, y3, y4], dim=1)))
        return y


class _Head(nn.Module):
    """Flatten (Keras H,W,C order) -> dropout -> dense 1024->16 -> LeakyReLU(0.1) -> dropout
    -> dense 16->1 -> fake score."""

    def __init__(self) -> None:
        super().__init__()
        self.drop1 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(8 * 8 * 16, 16)
        self.drop2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The dense kernel was trained on a channels-last flatten; flattening NCHW directly
        # would feed it the 1024 features in a different order.
        x = x.permute(0, 2, 3, 1).flatten(1)
        x = self.drop1(x)
        x = nn.functional.leaky_relu(self.fc1(x), negative_slope=0.1)
        x = self.fc2(self.drop2(x))
        # sigmoid(-z) == 1 - sigmoid(z), without the cancellation near P(real) = 1.
        return torch.sigmoid(-x).squeeze(1)


class Meso4(nn.Module):
    """Meso-4 (Afchar et al. 2018). Input: float32 (N, 3, 256, 256) RGB in [0, 1].

    Returns the fake score ``1 - P(real)`` in [0, 1], shape (N,).
    """

    KERAS_LAYERS: ClassVar[KerasLayout] = MESO4_LAYERS
    """Weighted layers in Keras creation order (`keras_h5.MESO4_LAYERS`)."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = _ConvBlock(3, 8, 3, pool=2)
        self.block2 = _ConvBlock(8, 8, 5, pool=2)
        self.block3 = _ConvBlock(8, 16, 5, pool=2)
        self.block4 = _ConvBlock(16, 16, 5, pool=4)
        self.head = _Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(x))))
        out: torch.Tensor = self.head(x)
        return out


class MesoInception4(nn.Module):
    """MesoInception-4 (Afchar et al. 2018). Input: float32 (N, 3, 256, 256) RGB in [0, 1].

    Returns the fake score ``1 - P(real)`` in [0, 1], shape (N,).
    """

    KERAS_LAYERS: ClassVar[KerasLayout] = MESOINCEPTION4_LAYERS
    """See `Meso4.KERAS_LAYERS`."""

    def __init__(self) -> None:
        super().__init__()
        self.incep1 = _InceptionBlock(3, 1, 4, 4, 2)
        self.incep2 = _InceptionBlock(11, 2, 4, 4, 2)
        self.block3 = _ConvBlock(12, 16, 5, pool=2)
        self.block4 = _ConvBlock(16, 16, 5, pool=4)
        self.head = _Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.incep2(self.incep1(x))))
        out: torch.Tensor = self.head(x)
        return out


def load_keras_weights(module: nn.Module, path: Path, layout: KerasLayout) -> None:
    """Load a Keras weights file into `module` with a strict key and shape check.

    Raises `ModelUnavailable` on any missing or unexpected key or shape mismatch: a
    silently half-loaded detector would score media with random weights.
    """
    state = {k: torch.from_numpy(v) for k, v in keras_state_dict(path, layout).items()}
    for key in list(state):
        if key.endswith(".running_var"):
            # torch-only bookkeeping buffer; strict loading requires it to be present.
            prefix = key.removesuffix(".running_var")
            state[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelUnavailable(
            f"{path}: weights do not fit {type(module).__name__}: {exc}"
        ) from exc
