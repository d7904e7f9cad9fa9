"""Deformable convolution operator (no Hydra, no data): ``deform_conv2d`` with torchvision's signature."""

from dcn_experiments.ops.deform_conv import cpu_extension_available, deform_conv2d, deform_conv2d_reference

__all__ = ["cpu_extension_available", "deform_conv2d", "deform_conv2d_reference"]
