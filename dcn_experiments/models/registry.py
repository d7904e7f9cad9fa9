"""The model registry (names are the options of the ``model`` config group)."""

from dcn_experiments.registry import Registry

MODELS = Registry(
    "model",
    contract=(
        "builder(num_classes: int, conv: ConvFactory, in_channels: int = 3, **model_cfg) -> nn.Module; "
        "registered with task='classification' (logits N x classes) or task='segmentation' "
        "(logits N x classes x H x W)"
    ),
)
