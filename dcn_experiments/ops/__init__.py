"""Deformable convolution operator (no Hydra, no data): ``deform_conv2d`` with torchvision's signature."""

from dcn_experiments.ops.deform_conv import (
    CPP_CPU,
    PYTORCH_FALLBACK,
    TORCHVISION_CUDA,
    backend_usage,
    cpu_extension_available,
    deform_conv2d,
    deform_conv2d_reference,
    precision_usage,
    reset_backend_usage,
)

__all__ = [
    "CPP_CPU",
    "PYTORCH_FALLBACK",
    "TORCHVISION_CUDA",
    "backend_usage",
    "cpu_extension_available",
    "deform_conv2d",
    "deform_conv2d_reference",
    "precision_usage",
    "reset_backend_usage",
]
