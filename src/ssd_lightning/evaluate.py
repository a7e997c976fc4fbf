"""Evaluation entry point: ``ssd-eval ckpt_path=<file.ckpt> [experiment=... | data=...]``.

Rebuilds the network and default boxes from the checkpoint alone (loaded with
``weights_only=True``: the checkpoint holds only tensors and plain values), runs the validation
split of the configured data through it, prints the metrics table (COCO AP, AP50, AP75,
APs/m/l, VOC07 mAP, per-class AP) and writes the metrics as JSON. Then, from the same
evaluation (:mod:`ssd_lightning.error_analysis`), it prints the classes of lowest AP and the
most confused class pairs, and writes per-class PR curves and the confusion matrix (PNG + CSV)
next to the JSON (``error_analysis=null`` turns this off).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.checkpoint import CheckpointError, build_network, load_checkpoint
from ssd_lightning.config import CONFIG_DIR, check_required
from ssd_lightning.ddp import launched_local_ranks
from ssd_lightning.error_analysis import analyse
from ssd_lightning.error_report import format_report, save
from ssd_lightning.loss import MultiBoxLoss
from ssd_lightning.metrics import format_table
from ssd_lightning.module import SSDModule
from ssd_lightning.train import build_datamodule

# SSDModule arguments restored from a checkpoint's hyperparameters (all plain values).
_PLAIN_ARGS = (
    "image_size", "mean", "std", "iou_threshold", "variances", "score_threshold",
    "nms_threshold", "max_detections", "class_names", "label_map",
)  # fmt: skip


def module_from_checkpoint(checkpoint: dict[str, Any], **overrides: Any) -> SSDModule:
    """The SSDModule of a checkpoint, weights loaded, ready for inference.

    The network is rebuilt by ``build_network`` (allow-listed classes only, never
    ``hydra.utils.instantiate`` of what the file names), the loss with the settings it was
    trained with.

    Args:
        checkpoint: as returned by :func:`load_checkpoint`.
        overrides: SSDModule arguments to change (e.g. ``score_threshold``).
    """
    hparams = checkpoint["hyper_parameters"]
    net_config = dict(hparams["net_config"])
    if "backbone_weights" in net_config:
        net_config["backbone_weights"] = None  # the checkpoint holds the trained weights
    meta = checkpoint.get("ssd", {})
    anchors = dict(meta.get("anchors") or hparams.get("anchors") or {})
    anchors.pop("feature_maps", None)  # measured again on the rebuilt network
    image_size = anchors.pop("image_size", hparams["image_size"])
    if "first_scale" not in anchors and anchors.get("sizes") is not None:
        anchors.pop("s_min", None)  # written before the size table and scales were exclusive
        anchors.pop("s_max", None)
    args = {k: hparams[k] for k in _PLAIN_ARGS if k in hparams}
    args.update(image_size=image_size, class_names=meta.get("class_names") or None)
    args.update(overrides)
    module = SSDModule(
        net=build_network(net_config),
        loss=MultiBoxLoss(**meta.get("loss", {})),
        optimizer=functools.partial(torch.optim.SGD, lr=0.0),
        anchors=anchors,
        net_config=net_config,
        **args,
    )
    state = dict(checkpoint["state_dict"])
    if "default_boxes" in state:  # written before the boxes moved into the box coder
        state["box_coder.default_boxes"] = state.pop("default_boxes")
    check_default_boxes(module, state["box_coder.default_boxes"])
    module.load_state_dict(state)
    module.on_load_checkpoint(checkpoint)
    return module.eval()


def check_default_boxes(module: SSDModule, stored: torch.Tensor) -> None:
    """Raise unless the checkpoint's stored boxes are those its anchor settings rebuild."""
    rebuilt = module.default_boxes
    if stored.shape == rebuilt.shape and torch.allclose(stored, rebuilt, atol=1e-6):
        return
    anchors = module.anchors
    if stored.shape != rebuilt.shape:
        where = f"{len(stored)} stored boxes, {len(rebuilt)} rebuilt"
    else:
        differs = (stored - rebuilt).abs().amax(dim=1) > 1e-6
        k = int(anchors.map_of_box[differs][0])
        where = (
            f"map {k} ({anchors.feature_maps[k][0]}x{anchors.feature_maps[k][1]}) differs "
            f"first, {int(differs.sum())} of {len(stored)} boxes in all"
        )
    raise CheckpointError(
        f"not a valid checkpoint: its stored default boxes differ from those its anchor "
        f"settings rebuild ({where}); settings: {anchors.describe()}"
    )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Validate a checkpoint on the configured data; print and save the metrics table and the
    error analysis."""
    check_required(cfg)
    checkpoint = load_checkpoint(cfg.ckpt_path)
    module = module_from_checkpoint(checkpoint)
    # The data must be prepared exactly as in training: take size and normalisation from it.
    hparams = checkpoint["hyper_parameters"]
    for key in ("image_size", "mean", "std"):
        OmegaConf.update(cfg, f"model.{key}", hparams[key], force_add=True)
    datamodule = build_datamodule(cfg, module)
    if cfg.match_classes == "by_name":
        module.reorder_classes(datamodule.class_names[1:])
        module.label_map = datamodule.label_map or None
    elif cfg.match_classes != "exact":
        raise ValueError(f"match_classes={cfg.match_classes!r}: use exact or by_name")
    module.check_class_names(datamodule)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    entry = "ssd_lightning.evaluate:evaluate"
    with launched_local_ranks(trainer, cfg, Path(cfg.output_json).parent, entry):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    results = module.last_val_results
    if trainer.is_global_zero:
        print(format_table(results), flush=True)
        path = Path(cfg.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_jsonable(results), indent=2))
        print(f"metrics written to {path}", flush=True)
        if cfg.get("error_analysis") is not None:
            report_errors(module, path.parent, **cfg.error_analysis)
    return results


def report_errors(
    module: SSDModule,
    folder: str | Path,
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
    top: int = 5,
) -> list[Path]:
    """Print the worst classes and most confused pairs of the module's last validation and
    write its PR curves and confusion matrix (PNG + CSV) into ``folder``; returns the files.

    Args:
        module: Validated; its ``val_metrics.last_coco_eval`` (gathered on every rank) is used.
        folder: Where the files go.
        score_threshold: Lowest score of a detection counted in the confusion matrix.
        iou_threshold: Lowest IoU of a match in the confusion matrix.
        top: Classes and pairs printed.
    """
    metrics = module.val_metrics
    analysis = analyse(metrics.last_coco_eval, metrics.class_names, score_threshold, iou_threshold)
    print(format_report(analysis, top), flush=True)
    paths = save(analysis, folder)
    print(f"PR curves and confusion matrix written to {Path(folder)}", flush=True)
    return paths


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    """Console script ``ssd-eval``."""
    _hydra_main()


if __name__ == "__main__":
    main()
