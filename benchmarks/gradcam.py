"""Grad-CAM heatmaps: the reference the runtime's occlusion maps are measured against.

Until the scan path stopped importing torch, evidence heatmaps were Grad-CAM (this code,
formerly `synthwatch/operators/gradcam.py`); the runtime now draws occlusion maps from
forward passes alone (`synthwatch/operators/heatmap.py`). Grad-CAM stays here, with torch
a dev dependency, so `bench_heatmaps.py` can say how close the replacement comes to it.

Grad-CAM (Selvaraju et al., ICCV 2017): weight each channel of a late convolutional
layer's activation by the spatial mean of the score's gradient with respect to it, sum
the weighted channels, keep the positive part, upsample to the input. The target layer
is the last `Conv2d` of the module, which for every detector shipped here (Meso-4,
MesoInception-4, our SBI and fingerprint nets) is the deepest layer that still has a
spatial map.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import numpy.typing as npt
import torch
from torch import nn


def last_conv(module: nn.Module) -> nn.Conv2d:
    """The module's last `Conv2d` in registration order. Raises ValueError if none."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(module).__name__} has no Conv2d layer to explain")
    return convs[-1]


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock(module: nn.Module) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(module, threading.Lock())


def grad_cam(module: nn.Module, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """(N, 3, H, W) float32 input -> (N, H, W) heatmaps in [0, 1] for the synthetic score.

    Gradients are taken per item (the score of item i only), so items in one batch do
    not explain each other. A map with no positive evidence is all zeros.

    Thread-safe: one module is explained by one thread at a time. The forward hook that
    captures the activation sits on the shared module, where another thread's forward
    would fire it too, and switching the module's mode races with a forward in flight;
    two concurrent Grad-CAMs on one module crashed the process (a segfault, or glibc's
    "free(): corrupted unsorted chunks") when `scan` explained two alerting items at
    once. The gradient is taken with respect to the activation alone
    (`torch.autograd.grad`), so no parameter's `.grad` is written or freed.
    """
    if batch.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {batch.shape}")
    layer = last_conv(module)
    acts: list[torch.Tensor] = []

    def keep(_m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        acts.append(out)

    with _lock(module):
        handle = layer.register_forward_hook(keep)
        was_training = module.training
        module.eval()
        try:
            with torch.enable_grad():
                x = torch.from_numpy(np.ascontiguousarray(batch)).requires_grad_(False)
                scores = module(x).reshape(-1)
                (grad,) = torch.autograd.grad(scores.sum(), acts[-1])
        finally:
            handle.remove()
            module.train(was_training)
    act = acts[-1].detach()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(dim=1, keepdim=True))
    cam = nn.functional.interpolate(
        cam, size=batch.shape[2:], mode="bilinear", align_corners=False
    ).squeeze(1)
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).reshape(-1, 1, 1)
    out = torch.where(peak > 1e-12, cam / peak, torch.zeros_like(cam))
    return out.numpy().astype(np.float32)
