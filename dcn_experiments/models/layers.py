"""Layers shared by the models that are not part of the regular-vs-deformable choice.

``OneDNNSafeConv2d`` is ``nn.Conv2d`` with one detour. oneDNN's AVX-512 1x1 convolution
(``jit_avx512_common_1x1_convolution_bwd_weights_t``, used by PyTorch for channels-last tensors on
CPU) writes past its workspace when the convolution is strided and has fewer input channels than
its 16-channel block: the weight gradient crashes the process (SIGSEGV, "double free or
corruption"), hangs, or on some machines comes out wrong (oneDNN issue #6035). Checked with torch
2.14.1: a (29, 8, 32, 32) channels-last input to a 1x1 stride-2 convolution crashes with 2 threads;
batch sizes 16 and 64 and 16+ input channels do not. ResNet's projection shortcut is exactly that
convolution at small widths, so it runs those shapes on NCHW tensors and hands the result back in
the input's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ONEDNN_CHANNEL_BLOCK = 16  # input channels per block of oneDNN's AVX-512 fp32 1x1 kernels


def hits_onednn_strided_1x1_bug(
    input: Tensor, kernel_size: tuple[int, ...], stride: tuple[int, ...], in_channels_per_group: int
) -> bool:
    """Whether ``F.conv2d`` on ``input`` would run oneDNN's faulty strided 1x1 nhwc backward."""
    return (
        input.device.type == "cpu"
        and tuple(kernel_size) == (1, 1)
        and max(stride) > 1
        and in_channels_per_group < ONEDNN_CHANNEL_BLOCK
        and input.dim() == 4
        and not input.is_contiguous()
        and input.is_contiguous(memory_format=torch.channels_last)
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


class OneDNNSafeConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes the shapes hit by oneDNN #6035 on NCHW tensors (same result)."""

    def forward(self, input: Tensor) -> Tensor:
        if not hits_onednn_strided_1x1_bug(input, self.kernel_size, self.stride, self.in_channels // self.groups):
            return super().forward(input)
        # oneDNN picks its nhwc path when the input *or* the weight looks channels-last, and a 1x1
        # weight moved to channels-last still passes is_contiguous(): clone it into NCHW strides.
        weight = self.weight.clone(memory_format=torch.contiguous_format)
        out = F.conv2d(input.contiguous(), weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return out.contiguous(memory_format=torch.channels_last)
