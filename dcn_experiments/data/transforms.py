"""Image transforms: classification pipelines and joint (image, mask) segmentation transforms."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dcn_experiments.errors import ConfigError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_image_size(image_size: int | None) -> None:
    """``dataset.image_size`` must be null (where allowed) or a positive whole number of pixels."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"dataset.image_size={image_size!r} must be a positive number of pixels per side")


def classification_transforms(
    train: bool,
    augment: bool,
    normalize: bool,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int | None = None,
) -> Callable[[Image.Image | np.ndarray], Tensor]:
    """PIL/uint8 image -> float tensor: optional resize, (train only) pad-crop + flip, optional normalise."""
    # deferred (here and below): any torchvision import pulls torch._dynamo (~1.4 s) into every CLI start
    import torchvision.transforms.v2 as T

    steps: list[Callable] = [T.ToImage()]
    if image_size is not None:
        steps.append(T.Resize((image_size, image_size), antialias=True))
    if train and augment:
        size = image_size
        steps += [T.RandomCrop(size, padding=max(1, size // 8)) if size else _PadCrop(), T.RandomHorizontalFlip()]
    steps.append(T.ToDtype(torch.float32, scale=True))
    if normalize:
        steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


class _PadCrop:
    """Random crop back to the input size after padding by 1/8 of it (CIFAR's 4 px at 32 px)."""

    def __call__(self, image: Tensor) -> Tensor:
        import torchvision.transforms.v2 as T

        size = tuple(image.shape[-2:])
        return T.RandomCrop(size, padding=max(1, size[0] // 8))(image)


class SegmentationTransform:
    """Joint transform: ``(PIL image, uint8 mask) -> (float[3,S,S], int64[S,S])``.

    Train: random rescale (``scale_range`` of the output size on the short side), random crop of
    ``size`` (padding with 0 for the image and ``ignore_index`` for the mask), horizontal flip.
    Val: resize the whole image to ``size`` x ``size``. Masks are always resized with nearest.
    """

    def __init__(
        self,
        size: int,
        train: bool,
        normalize: bool,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        scale_range: tuple[float, float] = (0.75, 1.5),
        hflip: bool = True,
        ignore_index: int = 255,
    ) -> None:
        self.size, self.train, self.normalize = size, train, normalize
        self.mean, self.std = list(mean), list(std)
        self.scale_range, self.hflip, self.ignore_index = scale_range, hflip, ignore_index

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[Tensor, Tensor]:
        import torchvision.transforms.v2 as T
        import torchvision.transforms.v2.functional as TF

        img = TF.to_image(image)
        target = torch.from_numpy(np.ascontiguousarray(mask)).unsqueeze(0)
        if self.train:
            short = min(img.shape[-2:])
            scale = random.uniform(*self.scale_range) * self.size / short
            new_size = [max(1, round(img.shape[-2] * scale)), max(1, round(img.shape[-1] * scale))]
            img = TF.resize(img, new_size, antialias=True)
            target = TF.resize(target, new_size, interpolation=T.InterpolationMode.NEAREST)
            pad_h, pad_w = max(0, self.size - new_size[0]), max(0, self.size - new_size[1])
            if pad_h or pad_w:
                img = TF.pad(img, [0, 0, pad_w, pad_h], fill=0)
                target = TF.pad(target, [0, 0, pad_w, pad_h], fill=self.ignore_index)
            top = random.randint(0, img.shape[-2] - self.size)
            left = random.randint(0, img.shape[-1] - self.size)
            img = img[..., top : top + self.size, left : left + self.size]
            target = target[..., top : top + self.size, left : left + self.size]
            if self.hflip and random.random() < 0.5:
                img, target = img.flip(-1), target.flip(-1)
        else:
            img = TF.resize(img, [self.size, self.size], antialias=True)
            target = TF.resize(target, [self.size, self.size], interpolation=T.InterpolationMode.NEAREST)
        out = TF.to_dtype(img, torch.float32, scale=True)
        if self.normalize:
            out = TF.normalize(out, self.mean, self.std)
        return out.as_subclass(Tensor).contiguous(), target[0].as_subclass(Tensor).long()
