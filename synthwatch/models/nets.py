"""The two small CNNs synthwatch trains itself: a face-crop model and a whole-image model.

Both take float32 NCHW RGB in [0, 1] and return the synthetic score in [0, 1] of shape
(N,), the same contract as every other detector in synthwatch (higher = more likely
synthetic), so the inference backends and `export_onnx` need nothing new. `logits` gives
the pre-sigmoid value for training (BCE on logits is the numerically stable form) and
for Grad-CAM, whose gradients vanish through a saturated sigmoid.

Grad-CAM (Selvaraju et al., ICCV 2017) hooks `features_last`, the last convolutional
block of each net: its output is the last map that still has a spatial layout before
global average pooling, and the score is a linear function of its channel means.

They are small on purpose (about 0.9 MB of float32 weights each): they are trained on
two CPU cores from a few hundred real images, where a large backbone would only
memorise its training set, and they score on CPU next to the sampler.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from synthwatch.models.inputs import FINGERPRINT_PATCH, SBI_INPUT_SIZE

__all__ = ["FINGERPRINT_PATCH", "SBI_INPUT_SIZE", "FingerprintNet", "SbiFaceNet"]


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU, no bias (BatchNorm supplies it)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _ScoreHead(nn.Module):
    """Global average pooling, dropout, one linear unit: the logit of "synthetic"."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, 1)

    def forward(self, features: Tensor) -> Tensor:
        pooled = features.mean(dim=(2, 3))
        out: Tensor = self.fc(self.dropout(pooled)).squeeze(1)
        return out


class SbiFaceNet(nn.Module):
    """Face-crop model trained on self-blended images (Shiohara & Yamasaki, CVPR 2022).

    Input: (N, 3, 128, 128) float32 RGB in [0, 1], a face crop as `crop_faces(frame,
    detections, scale=1.3, size=128)` cuts it. Five stages, stride 2 from the second on:
    128 -> 64 -> 32 -> 16 -> 8; the first conv runs at full resolution because the
    blend boundary is a fine, one- or two-pixel discontinuity that a strided stem would
    alias away. `features_last` is the 8x8x128 block Grad-CAM hooks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(3, 16)  # 128
        self.stage1 = nn.Sequential(_conv(16, 32, 2), _conv(32, 32))  # 64
        self.stage2 = nn.Sequential(_conv(32, 64, 2), _conv(64, 64))  # 32
        self.stage3 = _conv(64, 96, 2)  # 16
        self.features_last = _conv(96, 128, 2)  # 8
        self.head = _ScoreHead(128, dropout=0.2)
        _init(self)

    def features(self, x: Tensor) -> Tensor:
        """The `features_last` map, (N, 128, H/16, W/16)."""
        # Centre the pixels so the first BatchNorm starts from a zero-mean input; the
        # constants are fixed, so the exported graph needs no preprocessing node.
        x = (x - 0.5) * 4.0
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        out: Tensor = self.features_last(x)
        return out

    def logits(self, x: Tensor) -> Tensor:
        """Pre-sigmoid synthetic score, shape (N,)."""
        out: Tensor = self.head(self.features(x))
        return out

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(x))


class PixelDifferences(nn.Module):
    """Fixed (untrained) differences between each pixel and its right, lower and
    lower-right neighbours, per colour channel: (N, 3, H, W) -> (N, 9, H-1, W-1).

    Why: up-sampling copies or interpolates pixels, so neighbouring-pixel differences in
    a generated image alternate between near zero (inside an up-sampled cell) and larger
    values (across cells) with the up-sampler's period. Tan et al. ("Rethinking the
    Up-Sampling Operations in CNN-based Generative Network for Generalizable Deepfake
    Detection", CVPR 2024, NPR) showed that feeding a detector these local relations
    instead of pixels generalises across generators. NPR differences each pixel against
    the corner of its 2x2 cell, which assumes the patch is aligned with the generator's
    grid; differences between all neighbours keep the same information and do not care
    about the alignment. Subtracting neighbours also removes the image content's mean
    and colour, which a detector should not use. The output is scaled by 8 so the
    differences of an 8-bit image are of order one.
    """

    kernel: Tensor

    def __init__(self) -> None:
        super().__init__()
        kernel = torch.zeros(9, 3, 2, 2)
        for c in range(3):
            for k, (dy, dx) in enumerate(((0, 1), (1, 0), (1, 1))):
                kernel[3 * c + k, c, 0, 0] = -1.0
                kernel[3 * c + k, c, dy, dx] = 1.0
        self.register_buffer("kernel", kernel * 8.0)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.conv2d(x, self.kernel)


class FingerprintNet(nn.Module):
    """Whole-image model: up-sampling fingerprints in native-resolution patches.

    Input: (N, 3, P, P) float32 RGB in [0, 1], patches cut from the image at its own
    resolution (never resized: resizing adds or erases exactly the traces this net looks
    for). Fully convolutional and ending in global average pooling, so any P >= 16
    works; it was trained at P = 64 (`FINGERPRINT_PATCH`). `PixelDifferences` first,
    then two full-resolution convs (the period-2 and period-4 patterns are only visible
    before any striding), then three stride-2 stages. `features_last` is the
    (P/8)x(P/8)x96 block Grad-CAM hooks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.differences = PixelDifferences()
        self.full_res = nn.Sequential(_conv(9, 32), _conv(32, 32))
        self.stage1 = nn.Sequential(_conv(32, 64, 2), _conv(64, 64))
        self.stage2 = _conv(64, 128, 2)
        self.features_last = _conv(128, 96, 2)
        self.head = _ScoreHead(96, dropout=0.2)
        _init(self)

    def features(self, x: Tensor) -> Tensor:
        """The `features_last` map, (N, 96, about P/8, about P/8)."""
        x = self.stage2(self.stage1(self.full_res(self.differences(x))))
        out: Tensor = self.features_last(x)
        return out

    def logits(self, x: Tensor) -> Tensor:
        """Pre-sigmoid synthetic score, shape (N,)."""
        out: Tensor = self.head(self.features(x))
        return out

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(x))


def _init(module: nn.Module) -> None:
    """He initialisation for the ReLU convs; a zero head so training starts at score 0.5."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of float32 parameters and buffers: what the saved state dict costs."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point())
