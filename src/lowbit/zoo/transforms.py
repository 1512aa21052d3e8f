"""Image preprocessing: resize, center crop, scale to [0, 1], normalise; PIL + torch only.

The pipeline matches torchvision's ``Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize`` on PIL
images bit for bit (the tests check it against torchvision), without making torchvision a dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .paths import require


@dataclass(frozen=True)
class Preprocess:
    """``y = (crop(resize(img)) / 255 - mean) / std``, channels first, float32.

    Args:
        resize: the shorter side is resized to this many pixels (bilinear, aspect ratio kept; the longer
            side is truncated to ``int(resize * long / short)`` as torchvision does); ``None`` keeps the size.
        crop: side of the centred square crop (offset ``round((H - crop) / 2)``); ``None`` keeps the image.
        mean, std: per-channel normalisation, applied after scaling to [0, 1].
        mode: PIL mode the image is converted to first: ``"RGB"`` (3 channels) or ``"L"`` (1 channel).
    """

    resize: int | None = 256
    crop: int | None = 224
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    mode: str = "RGB"

    def __post_init__(self) -> None:
        channels = {"RGB": 3, "L": 1}.get(self.mode)
        if channels is None:
            raise ConfigError(f"Preprocess.mode must be 'RGB' or 'L', got {self.mode!r}")
        if len(self.mean) != channels or len(self.std) != channels:
            raise ConfigError(f"mode {self.mode!r} has {channels} channel(s): give that many mean/std values, "
                              f"got mean={self.mean}, std={self.std}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std values must be positive, got {self.std}")

    def __call__(self, image) -> torch.Tensor:
        """PIL image (or a path to one) -> float32 tensor of shape ``(C, crop, crop)``."""
        pil = require("PIL.Image", "image loading")
        if isinstance(image, (str, Path)):
            with pil.open(image) as im:
                image = im.convert(self.mode)
        else:
            image = image.convert(self.mode)
        if self.resize is not None:
            w, h = image.size
            if w <= h:
                size = (self.resize, int(self.resize * h / w))
            else:
                size = (int(self.resize * w / h), self.resize)
            if size != (w, h):
                image = image.resize(size, pil.BILINEAR)
        if self.crop is not None:
            w, h = image.size
            if w < self.crop or h < self.crop:
                raise ConfigError(f"image of size {w}x{h} is smaller than the crop {self.crop}; set resize >= crop")
            top = int(round((h - self.crop) / 2.0))
            left = int(round((w - self.crop) / 2.0))
            image = image.crop((left, top, left + self.crop, top + self.crop))
        arr = np.asarray(image, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return (x - mean) / std


#: EfficientNet-Lite0 (TF-ported weights): mean = std = 0.5, i.e. inputs in [-1, 1]. On the 1000 ImageNet
#: samples it gives top-1 0.876 (foolbox 17/20) against 0.773 (16/20) with the torchvision ImageNet
#: statistics, measured here (see zoo/README.md).
EFFICIENTNET_LITE = Preprocess()
#: The usual torchvision ImageNet statistics.
IMAGENET = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
#: Fashion-MNIST 28x28 grayscale: the training set's pixel mean and std.
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
FASHION = Preprocess(resize=None, crop=None, mean=(FASHION_MEAN,), std=(FASHION_STD,), mode="L")
#: MNIST digits 28x28 grayscale: the MNIST training set's pixel mean and std (torchvision's MNIST example).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST = Preprocess(resize=None, crop=None, mean=(MNIST_MEAN,), std=(MNIST_STD,), mode="L")
