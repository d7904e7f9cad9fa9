"""Geometric perturbations of whole batches (robustness evaluation): rotation, scaling, translation.

Each axis is one affine warp about the image centre, applied to a batch of images (bilinear) and,
for segmentation, to the batch of masks (nearest) with the same parameters, so they stay aligned.
Pixels that come from outside the frame get ``fill`` in the image (pass the value the dataset's
normalisation maps black to, see :func:`black_level`) and ``ignore_index`` in the mask.

* ``rotation``: degrees, counter-clockwise (as ``torch.rot90`` and ``TF.rotate``);
* ``scale``: zoom factor (< 1 shrinks the content about the centre, > 1 enlarges it);
* ``translation``: fraction of the image size, the content moves right and down by that much.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Axis:
    """One perturbation axis: its unit, its identity strength and the strengths evaluated (ascending)."""

    unit: str
    identity: float
    strengths: tuple[float, ...]


AXES: dict[str, Axis] = {
    "rotation": Axis("degrees", 0.0, (0.0, 22.5, 45.0, 67.5, 90.0)),
    "scale": Axis("factor", 1.0, (0.5, 0.75, 1.0, 1.25, 1.5)),
    "translation": Axis("fraction of size", 0.0, (0.0, 0.0625, 0.125, 0.1875, 0.25)),
}


def _affine_parameters(axis: str, strength: float, height: int, width: int) -> dict[str, object]:
    if axis == "rotation":  # TF.affine turns clockwise for positive angles
        return {"angle": -float(strength), "translate": [0.0, 0.0], "scale": 1.0}
    if axis == "scale":
        if strength <= 0:
            raise ValueError(f"scale strength must be > 0, got {strength}")
        return {"angle": 0.0, "translate": [0.0, 0.0], "scale": float(strength)}
    if axis == "translation":
        return {"angle": 0.0, "translate": [strength * width, strength * height], "scale": 1.0}
    raise ValueError(f"unknown perturbation axis {axis!r}; choose one of {', '.join(AXES)}")


def _warp_images(images: Tensor, params: dict[str, object], fill: float | Sequence[float]) -> Tensor:
    """Bilinear warp of ``images`` padded with ``fill``: the warp of the images padded with zeros plus
    ``fill`` times the share of each output pixel that comes from outside (a warped coverage channel)."""
    # deferred (here and below): any torchvision import pulls torch._dynamo (~1.4 s) into every CLI start
    import torchvision.transforms.v2 as T
    import torchvision.transforms.v2.functional as TF

    stacked = torch.cat([images, torch.ones_like(images[:, :1])], dim=1)
    warped = TF.affine(
        stacked, shear=[0.0, 0.0], interpolation=T.InterpolationMode.BILINEAR, fill=None, **params
    ).as_subclass(Tensor)
    content, coverage = warped[:, :-1], warped[:, -1:]
    # interior pixels: the four bilinear weights can sum to a few ulps below 1
    coverage = torch.where(coverage >= 1 - 8 * torch.finfo(coverage.dtype).eps, 1.0, coverage)
    fill_values = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
    return content + (1 - coverage) * fill_values


def perturb(
    images: Tensor,
    masks: Tensor | None,
    axis: str,
    strength: float,
    ignore_index: int = 255,
    fill: float | Sequence[float] = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """Warp ``images`` (N, C, H, W) and ``masks`` (N, H, W) or None along ``axis`` by ``strength``.

    The identity strength returns the inputs themselves, untouched. Images are resampled
    bilinearly with ``fill`` (one value or one per channel) outside the frame; masks with nearest
    and ``ignore_index`` outside the frame. Classification labels are not warped: pass None.
    """
    if axis not in AXES:
        raise ValueError(f"unknown perturbation axis {axis!r}; choose one of {', '.join(AXES)}")
    if strength == AXES[axis].identity:
        return images, masks
    height, width = images.shape[-2:]
    params = _affine_parameters(axis, strength, height, width)
    warped = _warp_images(images, params, fill)
    if masks is None:
        return warped, None
    import torchvision.transforms.v2 as T
    import torchvision.transforms.v2.functional as TF

    warped_masks = TF.affine(
        masks.unsqueeze(1),
        shear=[0.0, 0.0],
        interpolation=T.InterpolationMode.NEAREST,
        fill=float(ignore_index),
        **params,
    ).as_subclass(Tensor)
    return warped, warped_masks.squeeze(1).to(masks.dtype)


def black_level(dataset: Dataset, channels: int = 3) -> list[float]:
    """What black (0) becomes after ``dataset``'s normalisation, per channel (0 when it does not normalise).

    Reads the ``Normalize`` step of the dataset's transform (a ``transforms.v2.Compose``) or the
    ``normalize``/``mean``/``std`` of a joint segmentation transform; a transform of another kind
    is taken as not normalising, with a warning in the log.
    """
    transform = getattr(dataset, "transform", None)
    if all(hasattr(transform, key) for key in ("normalize", "mean", "std")):
        if not transform.normalize:
            return [0.0] * channels
        return [-m / s for m, s in zip(transform.mean, transform.std, strict=True)]
    steps = getattr(transform, "transforms", None)
    if transform is not None and steps is None:
        log.warning("cannot tell the normalisation of %s; pixels from outside the frame are filled with 0", transform)
    import torchvision.transforms.v2 as T

    for step in steps or []:
        if isinstance(step, T.Normalize):
            return [-m / s for m, s in zip(step.mean, step.std, strict=True)]
    return [0.0] * channels
