"""Deformable convolution operator (no Hydra, no data): ``deform_conv2d`` with torchvision's signature,
backed by the custom op ``torch.ops.dcn_experiments.deform_conv2d``."""

from dcn_experiments.ops.deform_conv import (
    CPP_CPU,
    CUDA_KERNEL_CHOICES,
    PYTORCH_FALLBACK,
    TORCHVISION_CUDA,
    backend_usage,
    cpu_extension_available,
    cuda_kernel,
    deform_conv2d,
    deform_conv2d_reference,
    precision_usage,
    register_cuda_kernel,
    reset_backend_usage,
    use_cuda_kernel,
)

__all__ = [
    "CPP_CPU",
    "CUDA_KERNEL_CHOICES",
    "PYTORCH_FALLBACK",
    "TORCHVISION_CUDA",
    "backend_usage",
    "cpu_extension_available",
    "cuda_kernel",
    "deform_conv2d",
    "deform_conv2d_reference",
    "precision_usage",
    "register_cuda_kernel",
    "reset_backend_usage",
    "use_cuda_kernel",
]
