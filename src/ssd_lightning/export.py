"""ONNX export: ``ssd-export ckpt_path=<file.ckpt> format=onnx [postprocess=true]``.

Two graphs, both with a dynamic batch axis, exported with ``torch.onnx.export(dynamo=True)``
(needs the export extra: onnx, onnxscript; onnxruntime to check the result):

- network only (default): ``images (B, 3, H, W)`` normalised as in training -> ``loc (B, A, 4)``
  offsets and ``cls_logits (B, A, C)``;
- ``postprocess=true``: the network plus ``ssd_lightning.postprocess`` (decoding, softmax,
  score threshold, per-class top-k and NMS as one ONNX ``NonMaxSuppression``) on a fixed pool
  of ``candidates`` pairs per image: ``images``, ``image_sizes (B, 2)`` as (h, w) ->
  ``boxes (N, 4)`` xyxy pixels of each image's size, ``scores (N,)``, ``labels (N,)`` in
  1..C-1 and ``batch_index (N,)``, by decreasing score within each image.

The input size, normalisation, class names, label map (dataset category id -> label) and
post-processing settings are stored in the ONNX metadata (JSON values).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.ops import box_iou

from ssd_lightning.config import CONFIG_DIR
from ssd_lightning.encoder import SSDBoxCoder
from ssd_lightning.evaluate import load_checkpoint, module_from_checkpoint
from ssd_lightning.module import SSDModule
from ssd_lightning.postprocess import PostProcessor


class SSDWithPostprocess(nn.Module):
    """An SSD network followed by its post-processing, in exportable form.

    One pass of ``PostProcessor.detect`` with a fixed pool of ``candidates`` (box, class)
    pairs per image, where ``PostProcessor`` itself grows the pool of an image until it
    suffices (a data-dependent loop). The detections equal ``PostProcessor``'s for every image
    with ``max_detections`` of them among its ``candidates`` best pairs, or with no more than
    ``candidates`` pairs above the score threshold.

    Args:
        net: network returning ``(loc (B, A, 4), cls_logits (B, A, C))``.
        post: the post-processing (its box coder on the export device).
        candidates: (box, class) pairs per image that enter NMS.

    Shape:
        - images: (B, 3, H, W); image_sizes: (B, 2) as (h, w)
        - output: boxes (N, 4) xyxy pixels, scores (N,), labels (N,), batch_index (N,), by
          image then decreasing score
    """

    def __init__(self, net: nn.Module, post: PostProcessor, candidates: int = 1000) -> None:
        super().__init__()
        self.net = net
        self.post = post
        self.candidates = int(candidates)

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        loc, cls_logits = self.net(images)
        found = self.post.detect(loc, cls_logits, image_sizes, self.candidates, export=True)
        image, slot = found.keep.nonzero().unbind(1)
        return found.boxes[image, slot], found.scores[image, slot], found.labels[image, slot], image


def with_postprocess(module: SSDModule, candidates: int = 1000) -> SSDWithPostprocess:
    """The module's network and post-processing settings as one exportable model (CPU)."""
    post, coder = module.postprocess, module.box_coder
    return SSDWithPostprocess(
        module.net,
        PostProcessor(
            SSDBoxCoder(module.default_boxes.cpu(), coder.iou_threshold, coder.variances),
            score_threshold=post.score_threshold,
            nms_threshold=post.nms_threshold,
            candidates_per_class=post.candidates_per_class,
            max_detections=post.max_detections,
            class_agnostic=post.class_agnostic,
        ),
        candidates,
    )


def export_onnx(
    module: SSDModule,
    path: str | Path,
    postprocess: bool = False,
    opset: int = 18,
    candidates: int = 1000,
) -> Path:
    """Export an SSDModule's network (and optionally its post-processing) to ONNX.

    Post-processing thresholds are the module's (``module_from_checkpoint(...,
    score_threshold=...)`` to change them).

    Returns:
        The path of the ``.onnx`` file written.
    """
    module = module.eval().cpu()
    h, w = _size_hw(module.hparams.image_size)
    images = torch.zeros(2, 3, h, w)  # batch 2: a batch of 1 would be specialised to 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    if postprocess:
        model: nn.Module = with_postprocess(module, candidates)
        args: tuple[Tensor, ...] = (images, torch.tensor([[h, w]] * 2))
        names = (["images", "image_sizes"], ["boxes", "scores", "labels", "batch_index"])
        dynamic: dict[str, Any] = {"images": {0: batch}, "image_sizes": {0: batch}}
    else:
        model, args = module.net, (images,)
        names = (["images"], ["loc", "cls_logits"])
        dynamic = {"images": {0: batch}}
    with torch.no_grad():
        program = torch.onnx.export(
            model.eval(),
            args,
            input_names=names[0],
            output_names=names[1],
            dynamic_shapes=dynamic,
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    program.model.metadata_props.update(_metadata(module, postprocess, candidates))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path, external_data=False)
    return path


def _size_hw(image_size: Any) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def _metadata(module: SSDModule, postprocess: bool, candidates: int) -> dict[str, str]:
    hparams = module.hparams
    meta = {
        "image_size": list(_size_hw(hparams.image_size)),
        "mean": list(hparams.mean),
        "std": list(hparams.std),
        "class_names": list(module.class_names or []),
        "label_map": {str(k): v for k, v in (module.label_map or {}).items()},
        "postprocess": postprocess,
    }
    if postprocess:
        post = module.postprocess
        meta.update(score_threshold=post.score_threshold, nms_threshold=post.nms_threshold)
        meta.update(max_detections=post.max_detections, class_agnostic=post.class_agnostic)
        meta.update(candidates_per_class=post.candidates_per_class, candidates=candidates)
    return {key: json.dumps(value) for key, value in meta.items()}


def run_onnx(path: str | Path, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """The outputs of an exported model in onnxruntime (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def max_differences(got: Sequence[Tensor], want: Sequence[Tensor]) -> list[float]:
    """Max absolute difference of every output (network-only export).

    Raises:
        ValueError: if an output's shape differs.
    """
    diffs = []
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"output shape {tuple(a.shape)} != {tuple(b.shape)}")
        diffs.append(float((a.double() - b.double()).abs().max()) if a.numel() else 0.0)
    return diffs


def matched_detections(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    """Fraction of the detections in ``got`` that ``want`` has too (same image and label,
    IoU >= 0.99): outputs ``(boxes, scores, labels, batch_index)`` of ``SSDWithPostprocess``.

    Detections, not tensors, are compared: nearly tied scores may come out in another order.
    """
    (boxes, _, labels, image), (boxes2, _, labels2, image2) = got, want
    if len(boxes) == 0:
        return float(len(boxes2) == 0)
    same = (image[:, None] == image2[None]) & (labels[:, None] == labels2[None])
    match = same & (box_iou(boxes.float(), boxes2.float()) >= 0.99)
    return float(match.any(dim=1).float().mean())


def export(cfg: DictConfig) -> Path:
    """The ``ssd-export`` app: export, then check the result in onnxruntime."""
    if cfg.format != "onnx":
        raise ValueError(f"format={cfg.format!r}: only onnx is supported")
    for name in ("onnxscript", "onnx_ir"):  # their graph-optimiser notes, one per pass
        logging.getLogger(name).setLevel(logging.WARNING)
    thresholds = {k: cfg[k] for k in ("score_threshold", "nms_threshold", "max_detections")}
    overrides = {k: v for k, v in thresholds.items() if v is not None}
    module = module_from_checkpoint(load_checkpoint(cfg.ckpt_path), **overrides)
    ckpt = Path(cfg.ckpt_path)
    default = ckpt.with_suffix(".postprocess.onnx" if cfg.postprocess else ".onnx")
    path = export_onnx(module, cfg.output or default, cfg.postprocess, cfg.opset, cfg.candidates)
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB)", flush=True)
    if cfg.check:  # random images: a check of the graph, not of the detector
        h, w = _size_hw(module.hparams.image_size)
        inputs: tuple[Tensor, ...] = (torch.randn(3, 3, h, w),)
        model: nn.Module = module.net
        if cfg.postprocess:
            inputs = (*inputs, torch.tensor([[h, w]] * 3))
            model = with_postprocess(module, cfg.candidates)
        with torch.no_grad():
            want = model.eval()(*inputs)
        got = run_onnx(path, inputs)
        if cfg.postprocess:
            agree = matched_detections(got, want)
            print(
                f"onnxruntime: {len(got[0])} detections, {100 * agree:.1f}% of them also "
                f"found by PyTorch ({len(want[0])} detections)",
                flush=True,
            )
        else:
            diffs = max_differences(got, want)
            print(f"onnxruntime vs PyTorch, max abs difference per output: {diffs}", flush=True)
    return path


# An absolute path: a relative one fails under console scripts (Hydra resolves it against
# the module name there, not the file).
@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def _hydra_main(cfg: DictConfig) -> None:
    export(cfg)


def main() -> None:
    """Console script ``ssd-export``."""
    _hydra_main()


if __name__ == "__main__":
    main()
