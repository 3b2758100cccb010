"""What each detector is fed: input sizes and views, with no deep-learning framework.

The runtime scan path (ONNX Runtime) and the torch modules used for training and export
share these, so a model's preprocessing is defined once and the scanner never imports
torch to learn a crop size.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image

MESO_INPUT_SIZE = 256
"""Side of the square face crop Meso-4 and MesoInception-4 were trained on."""

SBI_INPUT_SIZE = 128
"""Side of the square face crop `SbiFaceNet` scores (face box enlarged 1.3x, as
`synthwatch.operators.faces.crop_faces` cuts it). 128 keeps the blend boundary, which
sits about 10-15% of the crop in from its edge, several pixels wide after the resize,
and keeps training inside a CPU budget; the SBI paper used 380 with EfficientNet-B4."""

FINGERPRINT_PATCH = 64
"""Side of the native-resolution patches `FingerprintNet` is trained on. Up-sampling
traces have a period of 2 or 4 pixels, so 64 pixels hold 16 or more periods; the net is
fully convolutional and accepts any patch size of at least 16 pixels."""

SCENE_SIZE = 224
"""Side of the square the scene probe (ImageNet MobileNetV2 features) sees."""


def scene_view(image: npt.NDArray[np.uint8], size: int = SCENE_SIZE) -> npt.NDArray[np.uint8]:
    """A frame as the scene probe sees it: the centre square, resized to `size` with
    Lanczos (antialiased when shrinking), so every image has one geometry."""
    h, w = image.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side]))
    return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
