"""``dcn-export RUN_DIR_OR_CHECKPOINT``: a trained run as an ONNX file with the standard ``DeformConv``.

The model is rebuilt from the config inside the checkpoint (as ``dcn-eval`` does), exported with
``torch.onnx.export(dynamo=True)``, each ``dcn_experiments::deform_conv2d`` translated into the
ONNX operator ``DeformConv`` (opset >= 19), so the file holds standard operators only. The file is
then checked in onnxruntime on a batch of the run's own validation images: the largest difference
to PyTorch (failing above 1e-4 relative to the largest output magnitude) and the latency per image
of both are printed.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from dcn_experiments.cli import exit_on_user_error, one_line
from dcn_experiments.data import make_loader
from dcn_experiments.engine import read_checkpoint
from dcn_experiments.errors import ConfigError, DataError, UserError
from dcn_experiments.eval import check_run, model_from_checkpoint
from dcn_experiments.models import deformable_layers

log = logging.getLogger(__name__)

MIN_OPSET = 19  # the first opset with DeformConv
MAX_RELATIVE_DIFFERENCE = 1e-4  # max |onnxruntime - PyTorch| / max |PyTorch|
DEFAULT_NAME = "model.onnx"
INPUT_NAME, OUTPUT_NAME = "images", "output"
DEFORM_OP = torch.ops.dcn_experiments.deform_conv2d.default


class ExportError(UserError):
    """The ONNX file cannot be written or does not load or match PyTorch."""


def deform_conv_to_onnx(
    input: Any,
    offset: Any,
    weight: Any,
    bias: Any = None,
    mask: Any = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
) -> Any:
    """ONNX translation of ``dcn_experiments::deform_conv2d``: the standard ``DeformConv`` (opset 19).

    ONNX's operator has torchvision's offset layout (``[dy, dx]`` per tap and offset group) and
    its optional inputs in the order bias, mask; the group counts follow from the shapes.
    """
    from onnxscript import opset19 as op

    kernel_h, kernel_w = int(weight.shape[2]), int(weight.shape[3])
    return op.DeformConv(
        input,
        weight,
        offset,
        bias,
        mask,
        dilations=[int(d) for d in dilation],
        group=int(input.shape[1]) // int(weight.shape[1]),
        kernel_shape=[kernel_h, kernel_w],
        offset_group=int(offset.shape[1]) // (2 * kernel_h * kernel_w),
        pads=[int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])],
        strides=[int(s) for s in stride],
    )


@dataclass
class TrainedModel:
    """A run's model in eval mode, a batch of its validation images and where they came from."""

    model: nn.Module
    images: Tensor
    checkpoint: Path
    description: str


def load_trained(source: Path, images: int) -> TrainedModel:
    """The model of a run folder or checkpoint file (CPU, eval mode) and up to ``images`` of its
    validation images; one-line errors for a missing, failed or foreign run."""
    source = Path(source)
    if source.is_dir():
        checkpoint_path = check_run(source)
    elif source.is_file():
        checkpoint_path = source
    else:
        raise DataError(f"{source} not found; pass a run folder written by dcn-train or its checkpoints/last.pt")
    checkpoint = read_checkpoint(checkpoint_path)
    cfg = OmegaConf.create(checkpoint["config"])
    _, data, model = model_from_checkpoint(checkpoint, checkpoint_path)
    loader = make_loader(
        data.val, batch_size=images, num_workers=0, shuffle=False, seed=cfg.seed, device=torch.device("cpu"),
        name="validation",
    )  # fmt: skip
    batch = next(iter(loader))[0].float().contiguous()
    return TrainedModel(model.float().eval(), batch, checkpoint_path, f"{cfg.model.name} {cfg.conv.name}")


def export_onnx(model: nn.Module, example: Tensor, path: Path, opset: int, dynamic_batch: bool) -> None:
    """Write ``model`` (traced on ``example``) to ``path`` as ONNX with standard operators only."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError:
        raise ExportError(
            "dcn-export needs onnxscript, onnx and onnxruntime: pip install 'dcn-experiments[deploy]'"
        ) from None
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    if dynamic_batch and example.shape[0] == 1:  # a batch of 1 would be specialised to 1
        example = example.expand(2, *example.shape[1:]).contiguous()
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            custom_translation_table={DEFORM_OP: deform_conv_to_onnx},
            dynamic_shapes=dynamic_shapes,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,
            report=False,
        )
    except Exception as error:
        raise ExportError(f"torch.onnx.export failed: {type(error).__name__}: {one_line(error)[:300]}") from None
    program.save(str(path), external_data=False)


def check_standard(path: Path) -> dict[str, int]:
    """Operator counts of the ONNX file at ``path``; an error if any operator is outside the standard domain."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom or model.functions:
        names = custom + [f"function {f.domain}::{f.name}" for f in model.functions]
        raise ExportError(f"{path} holds non-standard operators ({', '.join(names)}); it would not run everywhere")
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def onnxruntime_session(path: Path, threads: int) -> Any:
    """An onnxruntime CPU session for ``path``; a one-line error if onnxruntime cannot load it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise here
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(
            f"onnxruntime {ort.__version__} cannot load {path}: {one_line(error)[:300]}; "
            "use onnxruntime >= 1.20 (DeformConv) or a lower --opset"
        ) from None


def differences(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Max absolute difference and that divided by the reference's largest magnitude."""
    absolute = float(np.max(np.abs(ours.astype(np.float64) - reference.astype(np.float64))))
    scale = float(np.max(np.abs(reference))) or 1.0
    return absolute, absolute / scale


def latency_per_image(runs: dict[str, Callable[[], Any]], batch: int, repeats: int) -> dict[str, float]:
    """Median seconds per image of each callable, the callables timed interleaved (a loaded machine
    slows them alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) / batch for name, values in times.items()}


def default_output(source: Path) -> Path:
    """``RUN_DIR/model.onnx`` for a run folder, ``<checkpoint stem>.onnx`` beside a checkpoint file."""
    return source / DEFAULT_NAME if source.is_dir() else source.with_suffix(".onnx")


def run_export(
    source: Path,
    output: Path | None = None,
    opset: int = MIN_OPSET,
    dynamic_batch: bool = False,
    images: int = 8,
    repeats: int = 10,
    threads: int | None = None,
) -> dict[str, Any]:
    """Export, verify and time one run; returns what it measured. The file lands at ``output`` only
    if onnxruntime loads it and matches PyTorch (a failing one is kept as ``*.failed.onnx``)."""
    import onnx

    if opset < MIN_OPSET:
        raise ConfigError(f"--opset {opset}: ONNX has the standard DeformConv from opset {MIN_OPSET}; use 19 or higher")
    if opset > onnx.defs.onnx_opset_version():
        raise ConfigError(
            f"--opset {opset}: onnx {onnx.__version__} knows opsets up to {onnx.defs.onnx_opset_version()}"
        )
    if images < 1:
        raise ConfigError(f"--images {images} must be >= 1")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads {threads} must be >= 1")
        torch.set_num_threads(threads)
    source = Path(source)
    trained = load_trained(source, images)
    output = Path(output) if output is not None else default_output(source)
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file path such as {output / DEFAULT_NAME}")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        export_onnx(trained.model, trained.images, staging, opset, dynamic_batch)
        result = _verify(trained, staging, dynamic_batch, repeats)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    result.update(output=str(output), opset=opset, dynamic_batch=dynamic_batch, checkpoint=str(trained.checkpoint))
    if result["relative_difference"] > MAX_RELATIVE_DIFFERENCE:
        failed = output.with_name(f"{output.stem}.failed.onnx")
        os.replace(staging, failed)
        raise ExportError(
            f"onnxruntime differs from PyTorch by {result['relative_difference']:.2e} relative "
            f"(max abs {result['absolute_difference']:.2e}) > {MAX_RELATIVE_DIFFERENCE:g}; kept as {failed}"
        )
    os.replace(staging, output)
    return result


def _verify(trained: TrainedModel, path: Path, dynamic_batch: bool, repeats: int) -> dict[str, Any]:
    counts = check_standard(path)
    layers = sum(1 for _ in deformable_layers(trained.model))
    if counts.get("DeformConv", 0) != layers:
        raise ExportError(f"{path} has {counts.get('DeformConv', 0)} DeformConv nodes for {layers} deformable layers")
    threads = torch.get_num_threads()
    session = onnxruntime_session(path, threads)
    images = trained.images
    feed = {INPUT_NAME: images.numpy()}
    with torch.inference_mode():
        reference = trained.model(images).numpy()
    absolute, relative = differences(session.run(None, feed)[0], reference)
    if dynamic_batch and images.shape[0] > 1:  # another batch size through the same file
        with torch.inference_mode():
            single = trained.model(images[:1]).numpy()
        one = differences(session.run(None, {INPUT_NAME: images[:1].numpy()})[0], single)
        absolute, relative = max(absolute, one[0]), max(relative, one[1])

    def pytorch() -> None:
        with torch.inference_mode():
            trained.model(images)

    latency = latency_per_image(
        {"pytorch": pytorch, "onnxruntime": lambda: session.run(None, feed)}, len(images), repeats
    )
    return {
        "model": trained.description,
        "deform_conv_nodes": counts.get("DeformConv", 0),
        "images": int(images.shape[0]),
        "absolute_difference": absolute,
        "relative_difference": relative,
        "latency_pytorch_ms": latency["pytorch"] * 1e3,
        "latency_onnxruntime_ms": latency["onnxruntime"] * 1e3,
        "threads": threads,
    }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """Parse arguments, export and verify one run, print what was written and measured."""
    parser = argparse.ArgumentParser(prog="dcn-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, metavar="RUN_DIR_OR_CHECKPOINT", help="a dcn-train run folder or .pt")
    parser.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset, >= {MIN_OPSET} (default)")
    parser.add_argument("--dynamic-batch", action="store_true", help="let the file take any batch size")
    parser.add_argument("--output", type=Path, default=None, help="the .onnx path (default RUN_DIR/model.onnx)")
    parser.add_argument("--images", type=int, default=8, help="validation images to verify and time on (default 8)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both runtimes (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run_export(args.source, args.output, args.opset, args.dynamic_batch, args.images, threads=args.threads)
    batch = "any batch size" if result["dynamic_batch"] else f"batch {result['images']}"
    print(
        f"wrote {result['output']} ({result['model']}, opset {result['opset']}, {batch}, "
        f"{result['deform_conv_nodes']} DeformConv nodes, standard operators only)"
    )
    print(
        f"onnxruntime vs PyTorch on {_count(result['images'], 'validation image')}: max abs diff "
        f"{result['absolute_difference']:.2e}, max rel diff {result['relative_difference']:.2e} "
        f"(limit {MAX_RELATIVE_DIFFERENCE:g})"
    )
    print(
        f"latency per image (batch {result['images']}, {_count(result['threads'], 'thread')}): PyTorch "
        f"{result['latency_pytorch_ms']:.3f} ms, onnxruntime {result['latency_onnxruntime_ms']:.3f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
