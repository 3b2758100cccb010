"""MTCNN's P-Net, R-Net and O-Net as torch modules, for ONNX export and tests only.

The scan path runs the cascade in `synthwatch.models.mtcnn` without torch; it takes the nets
as plain array functions, which these modules become once exported. The architecture is
Zhang et al. 2016 ("Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks", IEEE Signal Processing Letters 23(10)); the state-dict key names,
the PReLU placement and the Caffe flatten order are those of the facenet-pytorch port
(timesler, MIT), whose weight files we load by path. The code is written here; nothing
depends on facenet-pytorch or torchvision.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from synthwatch.errors import ModelUnavailable
from synthwatch.models.mtcnn import FloatArray, Net


def _caffe_flatten(x: Tensor) -> Tensor:
    # The dense layers were trained in Caffe, which the port fed with (N, W, H, C) memory
    # order; flattening PyTorch's (N, C, H, W) directly would scramble the dense weights.
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal net: fully convolutional, one output cell per 12x12 window, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map normalised (N, 3, H, W) to face probability (N, H', W'), offsets (N, 4, H', W')."""
        h: Tensor = self.pool1(self.prelu1(self.conv1(x)))
        h = self.prelu2(self.conv2(h))
        h = self.prelu3(self.conv3(h))
        logits: Tensor = self.conv4_1(h)
        offsets: Tensor = self.conv4_2(h)
        return torch.softmax(logits, dim=1)[:, 1], offsets


class RNet(nn.Module):
    """Refinement net: scores and re-regresses 24x24 crops of the P-Net candidates."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map normalised (N, 3, 24, 24) to face probability (N,) and box offsets (N, 4)."""
        h: Tensor = self.pool1(self.prelu1(self.conv1(x)))
        h = self.pool2(self.prelu2(self.conv2(h)))
        h = self.prelu3(self.conv3(h))
        h = self.prelu4(self.dense4(_caffe_flatten(h)))
        logits: Tensor = self.dense5_1(h)
        offsets: Tensor = self.dense5_2(h)
        return torch.softmax(logits, dim=1)[:, 1], offsets


class ONet(nn.Module):
    """Output net: final score, box offsets and five landmarks for 48x48 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Map normalised (N, 3, 48, 48) to probability (N,), offsets (N, 4), landmarks (N, 10).

        Landmarks are fractions of the crop: five x values, then five y values.
        """
        h: Tensor = self.pool1(self.prelu1(self.conv1(x)))
        h = self.pool2(self.prelu2(self.conv2(h)))
        h = self.pool3(self.prelu3(self.conv3(h)))
        h = self.prelu4(self.conv4(h))
        h = self.prelu5(self.dense5(_caffe_flatten(h)))
        logits: Tensor = self.dense6_1(h)
        offsets: Tensor = self.dense6_2(h)
        landmarks: Tensor = self.dense6_3(h)
        return torch.softmax(logits, dim=1)[:, 1], offsets, landmarks


def load_mtcnn_nets(paths: Sequence[Path]) -> tuple[PNet, RNet, ONet]:
    """P-Net, R-Net and O-Net in eval mode on CPU, from the facenet-pytorch weight files.

    `paths` are the P-Net, R-Net and O-Net state dicts, in that order. Raises ValueError
    unless there are three, and ModelUnavailable for a file that is missing, is not a state
    dict, or whose keys or shapes do not match its net.
    """
    if len(paths) != 3:
        raise ValueError(f"expected the P-Net, R-Net and O-Net weight paths, got {len(paths)}")
    pnet, rnet, onet = PNet(), RNet(), ONet()
    for net, path in zip((pnet, rnet, onet), paths, strict=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            # strict=True: a key or shape mismatch means the wrong file or a wrong port, and
            # a silently half-initialised detector would only show up as missed faces.
            net.load_state_dict(state, strict=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
            raise ModelUnavailable(f"MTCNN weights {path} could not be loaded: {exc}") from exc
        net.eval()
    return pnet, rnet, onet


def array_nets(nets: tuple[PNet, RNet, ONet]) -> tuple[Net, Net, Net]:
    """The modules as the cascade's array functions (`synthwatch.models.mtcnn.Net`).

    Each runs under `torch.inference_mode` on CPU. The modules are switched to channels-last
    memory in place: that runs these small convolutions and, above all, the max-pools two to
    three times faster on CPU than NCHW does.
    """
    return _as_array_net(nets[0]), _as_array_net(nets[1]), _as_array_net(nets[2])


def _as_array_net(net: nn.Module) -> Net:
    net.to(memory_format=torch.channels_last).eval()

    def run(batch: FloatArray) -> tuple[FloatArray, ...]:
        with torch.inference_mode():
            x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
            outputs: tuple[Tensor, ...] = net(x)
            return tuple(out.numpy().astype(np.float32, copy=False) for out in outputs)

    return run
