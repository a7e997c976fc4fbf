"""Hydra/OmegaConf helpers: resolvers and checks shared by the entry points.

Resolvers (registered on import, usable in any conf/ file):

- ``${count_classes:${data.class_names}}`` -> number of classes including background.
- ``${yolo_names:${data.root}}`` -> the class names of ``<root>/data.yaml`` (Ultralytics:
  ``names:`` a list or an index-to-name map), the default of ``data=yolo``.
- ``${run_id:}`` / ``${run_id:<name>}`` -> the name of the run (or sweep) folder, shared by every
  process of a multi-process job and kept when SLURM requeues the job: ``<name>`` when given
  (the ``run_id=`` setting), else ``slurm-<array job id>_<task id>`` for a task of a SLURM job
  array, ``slurm-<job id>`` for another SLURM job, the torchrun run id (``--rdzv-id``), else a
  timestamp.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from ssd_lightning.anchors import (
    PAPER_ASPECT_RATIOS,
    AnchorSettingsError,
    aspect_ratios_for,
    boxes_per_location,
)


def _to_plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _count_classes(class_names: Any) -> int:
    names = list(_to_plain(class_names))
    return len(names) if names[:1] == ["background"] else len(names) + 1


def _yolo_names(root: Any) -> ListConfig:
    from ssd_lightning.data.yolo import read_class_names  # data code, only for data=yolo

    path = Path(str(root)) / "data.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no Ultralytics data.yaml to read the class names from; give them as "
            "data.class_names=[name0,name1,...] (in class-index order)"
        )
    return ListConfig(read_class_names(path))


def _run_id(name: str | None = None) -> str:
    """Run folder name: identical in every process of a SLURM or torchrun job, and in a SLURM
    job requeued after preemption or a time limit (it keeps its job id)."""
    if name is not None:
        return check_run_id(str(name))
    scheduled = scheduler_run_id()
    return scheduled if scheduled is not None else datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def scheduler_run_id() -> str | None:
    """The run's name given by the scheduler (SLURM job or array task, torchrun ``--rdzv-id``),
    or None when there is none (the same command run again then gets a new folder)."""
    slurm = slurm_job_id()
    if slurm is not None:
        return f"slurm-{slurm}"
    value = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return f"torchelastic-{value}" if value and value != "none" else None


def launch_rank() -> int:
    """The global rank a cluster launcher gave this process (torchrun ``RANK``, SLURM
    ``SLURM_PROCID``); 0 without one."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def slurm_job_id() -> str | None:
    """This SLURM job as squeue and scontrol name it: ``<array job id>_<task id>`` for a task
    of a job array, else ``<job id>``; None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def check_run_id(name: str) -> str:
    """``name`` if it can name a folder (no path separator, not ``.`` or ``..``)."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"run_id={name!r}: a run id names one folder; no '/' or '..'")
    return name


def register_resolvers() -> None:
    """Register the project's OmegaConf resolvers (idempotent)."""
    resolvers = (
        ("count_classes", _count_classes),
        ("yolo_names", _yolo_names),
        ("run_id", _run_id),
    )
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            # Cached per config object, as Hydra's ${now:}: a sweep's folder is resolved
            # several times and must keep its name.
            OmegaConf.register_new_resolver(name, fn, use_cache=True)


class MissingSettingError(ValueError):
    """A required (``???``) setting was not given on the command line or in an experiment."""


_HINTS = {
    "root": "the dataset folder, e.g. data.root=/data/VOCdevkit",
    "images": "the image folder",
    "annotation": "the annotation file",
}


def check_required(cfg: DictConfig) -> None:
    """Raise one clear error naming every required setting that is still ``???``.

    Raises:
        MissingSettingError: listing the missing keys with the override to write.
    """
    plain = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    # hydra.* keys are filled in by Hydra itself.
    missing = sorted(k for k in _missing_keys(plain) if not k.startswith("hydra."))
    if not missing:
        return
    lines = []
    for key in missing:
        leaf = key.rsplit(".", 1)[-1]
        hint = next((h for word, h in _HINTS.items() if word in leaf), "a value")
        lines.append(f"  {key}=...   ({hint})")
    raise MissingSettingError(
        "required settings are missing; give them on the command line:\n" + "\n".join(lines)
    )


def _missing_keys(tree: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is ``???`` in an unresolved plain container."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return [prefix.rstrip(".")] if tree == "???" else []
    return [k for key, value in items for k in _missing_keys(value, f"{prefix}{key}.")]


def to_plain(cfg: Any) -> Any:
    """A resolved config node as plain Python containers (for checkpoints and loggers)."""
    return _to_plain(cfg)


# conf/ at the repository root (the package is installed in editable mode, `make install`).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "train", output_dir: str | None = None
) -> DictConfig:
    """The app config as ``ssd-train <overrides>`` would see it, outside a Hydra run.

    For tests, notebooks and scripts. ``${hydra:...}`` values are unavailable here, so
    ``paths.output_dir`` is set to ``output_dir`` (required unless an override sets it).
    """
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    if output_dir is not None:
        cfg.paths.output_dir = str(output_dir)
    return cfg


def compose_option(group: str, name: str) -> Any:
    """One option of a config group as Hydra composes it (its own defaults applied), as plain
    values: ``compose_option("anchors", "ssd300_voc")`` is what ``anchors=ssd300_voc`` selects.

    Raises:
        FileNotFoundError: no such option, naming the known ones.
    """
    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its search path
            cfg = compose(config_name=f"{group}/{name}")
        else:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                cfg = compose(config_name=f"{group}/{name}")
    except MissingConfigException as e:
        known = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise FileNotFoundError(f"{group}={name}: no such option; known: {known}") from e
    return to_plain(cfg[group])


def build_network(cfg: DictConfig) -> nn.Module:
    """The network of ``cfg.model.net`` with heads for ``cfg.anchors.aspect_ratios``.

    The boxes per location of the heads come from the aspect ratios resolved for the
    network's own number of source maps, so an aspect-ratio rule fits any network.

    Raises:
        AnchorSettingsError: ``model.net.num_boxes`` set by hand (it would contradict the
            anchors) or aspect ratios that do not fit the network.
    """
    if cfg.model.net.get("num_boxes") is not None:
        raise AnchorSettingsError(
            f"model.net.num_boxes={to_plain(cfg.model.net.num_boxes)} contradicts "
            "anchors.aspect_ratios, which sets the boxes per location: leave num_boxes null"
        )
    spec = to_plain(cfg.anchors.get("aspect_ratios", PAPER_ASPECT_RATIOS))
    try:
        return instantiate(
            cfg.model.net,
            num_boxes=lambda num_maps: boxes_per_location(aspect_ratios_for(spec, num_maps)),
        )
    except InstantiationException as e:
        if isinstance(e.__cause__, AnchorSettingsError):  # ours, clear as it is
            raise e.__cause__ from None
        raise


def network_on_meta(cfg: DictConfig) -> nn.Module:
    """The configured network on the meta device: shapes only, no memory, no weights read."""
    net_cfg = cfg.model.net
    if net_cfg.get("backbone_weights") is not None:
        net_cfg = OmegaConf.merge(net_cfg, {"backbone_weights": None})
    with torch.device("meta"):
        return build_network(OmegaConf.merge(cfg, {"model": {"net": net_cfg}}))


register_resolvers()
