"""``ssd-anchors``: anchor coverage of a dataset before training (Hydra app).

Composes the training config tree (``conf/train.yaml``), so ``data=``, ``experiment=``,
``model=`` and ``anchors=`` mean what they mean for ``ssd-train``. Builds the training split
from ``cfg.data`` (annotations only, no image is decoded), measures the network's feature maps
from ``cfg.model`` and analyses the anchors of ``cfg.anchors``, plus the presets of
``conf/anchors`` named in ``compare`` (composed by Hydra like ``anchors=<name>``), plus the
``suggest``ed s_min / s_max. Prints one table with a column per configuration and writes
``anchor_coverage.json``, ``anchor_coverage.md`` and ``anchor_sizes.png`` (``anchor_report``)
into the run folder. Examples::

    ssd-anchors experiment=bccd data.root=/data/bccd suggest=true
    ssd-anchors experiment=bccd data.root=/data/bccd model=ssd300_vgg16 model.image_size=300 \
        anchors=ssd300 compare=[ssd300_voc,ssd300_coco]
    ssd-anchors data=coco data.root=/data/coco anchors=ssd300_coco iou_threshold=0.4

Presets of your own go into a folder on Hydra's search path
(``hydra.searchpath=[file:///my/conf]`` with ``/my/conf/anchors/mine.yaml``).
``analyse(cfg)`` is the plain function behind it (tests compose a config and call it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from ssd_lightning.anchor_analysis import (
    S_MAX_GRID,
    S_MIN_GRID,
    coverage,
    records_boxes,
    suggest_scales,
    summarize,
)
from ssd_lightning.anchor_report import format_report, format_suggestion, plot_sizes
from ssd_lightning.anchors import AnchorSettingsError, DefaultBoxes
from ssd_lightning.config import (
    CONFIG_DIR,
    check_required,
    compose_option,
    network_on_meta,
    to_plain,
)

CONFIG_NAME = "anchor_coverage"
# The entry config: the training tree plus the analysis settings (registered in Hydra's
# ConfigStore, so conf/ stays the training tree).
ENTRY_CONFIG = {
    "defaults": ["train", "_self_"],
    "task_name": "anchors",
    "split": "train",  # which dataset of data.datamodule: train, val or test
    "iou_threshold": "${module.iou_threshold}",
    "compare": [],  # more anchor presets: names in conf/anchors
    "suggest": False,  # grid-search s_min / s_max and add the result as a column
    "objective": "coverage",  # coverage | iou (see suggest_scales)
    "s_min_values": list(S_MIN_GRID),
    "s_max_values": list(S_MAX_GRID),
    "max_boxes": 20000,  # GT boxes sampled for the suggestion
    "progress": True,
}
ConfigStore.instance().store(name=CONFIG_NAME, node=ENTRY_CONFIG)


def analyse(cfg: DictConfig) -> dict[str, Any]:
    """Coverage of every configured anchor set on the dataset; writes the run folder's files.

    Returns:
        ``{"reports": [summary per configuration], "suggestion": {...} or None}``, the
        content of ``anchor_coverage.json``.
    """
    check_required(cfg)
    gt_boxes, image_sizes = dataset_boxes(cfg.data.datamodule[f"{cfg.split}_dataset"])
    net = network_on_meta(cfg)
    image_size = to_plain(cfg.model.image_size)
    configs = {_anchors_choice(): to_plain(cfg.anchors)}
    configs.update({name: compose_option("anchors", name) for name in cfg.compare})
    anchors = {
        name: _default_boxes(name, net, image_size, settings) for name, settings in configs.items()
    }
    main_name = next(iter(anchors))
    suggestion = None
    if cfg.suggest:
        suggestion = suggest_scales(
            gt_boxes, image_sizes, anchors[main_name],
            s_min_values=list(cfg.s_min_values), s_max_values=list(cfg.s_max_values),
            iou_threshold=cfg.iou_threshold, objective=cfg.objective, max_boxes=cfg.max_boxes,
        )  # fmt: skip
        anchors["suggested"] = anchors[main_name].with_scales(suggestion.s_min, suggestion.s_max)
    reports = [
        coverage(gt_boxes, image_sizes, db, cfg.iou_threshold, name, progress=cfg.progress)
        for name, db in anchors.items()
    ]
    table = format_report(reports)
    text = table if suggestion is None else f"{table}\n\n{format_suggestion(suggestion)}"
    print(text, flush=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "reports": [summarize(r) for r in reports],
        "suggestion": None if suggestion is None else dataclasses.asdict(suggestion),
    }
    (out / "anchor_coverage.json").write_text(json.dumps(result, indent=2))
    (out / "anchor_coverage.md").write_text(text + "\n")
    plot_sizes(reports, out / "anchor_sizes.png")
    print(f"written: {out / 'anchor_coverage.json'}, {out / 'anchor_sizes.png'}", flush=True)
    return result


def dataset_boxes(dataset_cfg: DictConfig) -> tuple[list[torch.Tensor], torch.Tensor]:
    """GT boxes (pixels, crowd regions left out) and image sizes of a dataset config node."""
    dataset = instantiate(dataset_cfg, _convert_="all", check_images=False)
    return records_boxes(dataset.records)


def _default_boxes(name: str, net: Any, image_size: Any, settings: dict) -> DefaultBoxes:
    try:
        return DefaultBoxes.for_network(net, image_size, **settings)
    except AnchorSettingsError as e:
        raise AnchorSettingsError(f"anchor preset {name!r} does not fit the network: {e}") from e


def _anchors_choice() -> str:
    """Column name of the main anchors: the conf/anchors option of this Hydra run if any."""
    if not HydraConfig.initialized():
        return "anchors"
    return str(HydraConfig.get().runtime.choices.get("anchors", "anchors"))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> None:
    analyse(cfg)


def main() -> None:
    """Console script ``ssd-anchors``."""
    _hydra_main()


if __name__ == "__main__":
    main()
