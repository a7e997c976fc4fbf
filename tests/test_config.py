"""Hydra configs: every experiment and trainer composes, targets exist, values interpolate."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from ssd_lightning.anchors import AnchorSettingsError, DefaultBoxes
from ssd_lightning.config import (
    CONFIG_DIR,
    MissingSettingError,
    build_network,
    check_required,
    compose_config,
    register_resolvers,
)
from ssd_lightning.optim import param_groups, scaled_lr, warmup_cosine, warmup_multistep

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml") if p.stem != "default")
REQUIRED = {"bccd": ["data.root"], "voc0712_ssd300": ["data.root"], "coco_ssd300": ["data.root"]}


def _with_root(experiment: str) -> list[str]:
    return [f"{key}=/data/somewhere" for key in REQUIRED.get(experiment, [])]


def _targets(node, path: str = ""):
    """(path, node) of every config node with a ``_target_``."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            yield from _targets(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node):
            yield from _targets(child, f"{path}[{i}]")


def test_all_experiments_and_trainers_are_found() -> None:
    assert {"quickstart", "tiny", "bccd", "voc0712_ssd300", "coco_ssd300"} <= set(EXPERIMENTS)
    assert {"cpu", "gpu", "ddp", "ddp_cpu", "multinode"} <= set(TRAINERS)


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_target_exists_and_takes_its_keys(experiment: str, trainer: str, tmp_path) -> None:
    """A misspelt ``_target_`` or argument fails here, without building anything."""
    cfg = compose_config(
        [f"experiment={experiment}", f"trainer={trainer}", *_with_root(experiment)],
        output_dir=tmp_path,
    )
    check_required(cfg)
    OmegaConf.resolve(cfg)
    found = list(_targets(cfg))
    assert {"model.net", "loss", "optim.optimizer", "sched", "trainer", "data.datamodule"} <= {
        path for path, _ in found
    }
    for path, node in found:
        target = get_object(node._target_)
        params = inspect.signature(target).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        keys = {k for k in node if not (k.startswith("_") and k.endswith("_"))}
        assert keys <= set(params), f"{path}: {sorted(keys - set(params))} not in {target}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_builds_module_parts(experiment: str, tmp_path) -> None:
    """Network, loss, optimiser and schedule instantiate; heads and anchors agree."""
    cfg = compose_config([f"experiment={experiment}", *_with_root(experiment)], output_dir=tmp_path)
    net = build_network(cfg)
    anchors = OmegaConf.to_container(cfg.anchors, resolve=True)
    size = cfg.model.image_size
    boxes = DefaultBoxes.for_network(net, size, **anchors)
    assert net.num_boxes == boxes.boxes_per_location
    loc, logits = net.eval()(torch.zeros(1, 3, size, size))
    assert loc.shape == (1, len(boxes), 4)
    assert logits.shape == (1, len(boxes), cfg.data.num_classes)
    labels = torch.zeros(1, len(boxes), dtype=torch.long)
    assert instantiate(cfg.loss)(loc, logits, torch.zeros_like(loc), labels)["loss"].isfinite()
    optimizer = instantiate(cfg.optim.optimizer)(param_groups(net, cfg.optim.no_decay_bias_norm))
    scheduler = instantiate(cfg.sched)(optimizer, total_steps=100, steps_per_epoch=10)
    assert scheduler.get_last_lr()[0] <= cfg.optim.optimizer.lr


def test_paper_recipes() -> None:
    voc = compose_config(["experiment=voc0712_ssd300", "data.root=/d"], output_dir="/tmp")
    assert voc.data.batch_size == 32 and voc.optim.optimizer.lr == 1e-3
    assert voc.data.num_classes == 21 and voc.trainer.max_steps == -1
    # 120k iterations of batch 32 on the 16,551 VOC07+12 trainval images, in epochs
    iterations = voc.trainer.max_epochs * (16551 // 32)
    assert abs(iterations - 120000) < 0.01 * 120000
    assert voc.optim.optimizer.momentum == 0.9 and voc.optim.optimizer.weight_decay == 5e-4
    assert [round(m * 120000) for m in voc.sched.milestones] == [80004, 99996]
    assert round(voc.sched.warmup_epochs * 16551 / 32) == 1034  # the recipe's ~1,000 steps
    eight_gpus = compose_config(
        ["experiment=voc0712_ssd300", "data.root=/d", "trainer=ddp", "trainer.devices=8"],
        output_dir="/tmp",
    )
    assert eight_gpus.trainer.max_epochs == voc.trainer.max_epochs  # same training, 8x sooner
    coco = compose_config(["experiment=coco_ssd300", "data.root=/d"], output_dir="/tmp")
    assert coco.trainer.max_epochs == 120 and coco.optim.optimizer.lr == 2e-3
    assert coco.data.num_classes == 81 and coco.anchors.first_scale == 0.07
    assert coco.trainer.precision == "bf16-mixed" and coco.module.channels_last


@pytest.mark.parametrize("experiment", sorted(REQUIRED))
def test_missing_data_root_is_one_clear_error(experiment: str) -> None:
    cfg = compose_config([f"experiment={experiment}"], output_dir="/tmp")
    with pytest.raises(MissingSettingError) as error:
        check_required(cfg)
    assert "data.root=" in str(error.value) and "dataset folder" in str(error.value)


def test_boxes_per_location_follows_aspect_ratios() -> None:
    """One sweep over aspect ratios changes the heads and the default boxes together."""
    cfg = compose_config(
        ["experiment=tiny", "anchors.aspect_ratios=[[2],[2],[2,3,4],[]]"], output_dir="/tmp"
    )
    net = build_network(cfg)
    assert net.num_boxes == [4, 4, 8, 2]
    boxes = DefaultBoxes.for_network(net, 96, **cfg.anchors)
    loc, _ = net.eval()(torch.zeros(1, 3, 96, 96))
    assert loc.shape[1] == len(boxes) == 12 * 12 * 4 + 6 * 6 * 4 + 3 * 3 * 8 + 1 * 2


def test_num_boxes_set_by_hand_contradicts_the_anchors() -> None:
    cfg = compose_config(["experiment=tiny", "model.net.num_boxes=[4,4,4,4]"], output_dir="/tmp")
    with pytest.raises(AnchorSettingsError, match=r"num_boxes=.* contradicts anchors\.aspect_r"):
        build_network(cfg)


def test_single_sources_of_truth() -> None:
    cfg = compose_config(
        ["experiment=bccd", "data.root=/d", "model.image_size=320", "model.mean=[0.5,0.5,0.5]"],
        output_dir="/tmp",
    )
    assert cfg.model.net.num_classes == cfg.data.num_classes == 4  # 3 cells + background
    assert cfg.data.datamodule.image_size == 320
    assert list(cfg.data.datamodule.mean) == [0.5, 0.5, 0.5]
    assert cfg.data.datamodule.train_dataset.roots == ["/d"]
    assert cfg.data.datamodule.seed == cfg.seed


def test_sweep_overrides_are_top_level_friendly() -> None:
    cfg = compose_config(["anchors.s_min=0.1", "loss.neg_pos_ratio=5"], output_dir="/tmp")
    assert cfg.anchors.s_min == 0.1 and cfg.loss.neg_pos_ratio == 5


def test_run_id_resolver(monkeypatch) -> None:
    register_resolvers()
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)

    def run_id() -> str:
        return OmegaConf.create({"id": "${run_id:}"}).id

    assert run_id()[:2] == "20"  # a timestamp
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default: not a shared id
    assert run_id()[:2] == "20"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert run_id() == "torchelastic-job7"
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert run_id() == "slurm-123"
    node = OmegaConf.create({"a": "${run_id:}", "b": "${run_id:}"})
    assert node.a == node.b  # one name per config, however often it is resolved


def test_count_classes_resolver() -> None:
    register_resolvers()
    node = OmegaConf.create({"a": ["x", "y"], "n": "${count_classes:${a}}"})
    assert node.n == 3
    node = OmegaConf.create({"a": ["background", "x"], "n": "${count_classes:${a}}"})
    assert node.n == 2


def _sgd(lr: float = 1.0) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(scheduler, steps: int) -> list[float]:
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def test_warmup_multistep_values() -> None:
    # 20 steps per epoch: half an epoch of warm-up is 10 steps
    lrs = _lrs(warmup_multistep(_sgd(), 100, 20, (0.5, 0.75), 0.1, 0.5, 0.1), 100)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 * 0.5 + 0.5)  # linear from 0.1 to 1 over 10 steps
    assert lrs[10] == lrs[49] == 1.0
    assert lrs[50] == pytest.approx(0.1) and lrs[74] == pytest.approx(0.1)
    assert lrs[75] == pytest.approx(0.01) and lrs[99] == pytest.approx(0.01)


def test_warmup_is_capped_for_short_runs() -> None:
    lrs = _lrs(warmup_multistep(_sgd(), 20, 10, (), 0.1, 50.0, 0.0), 20)
    assert lrs[0] == 0.0 and lrs[4] == 1.0  # warm-up at most a fifth of the run


def test_warmup_cosine_values() -> None:
    lrs = _lrs(warmup_cosine(_sgd(2.0), 110, 5, warmup_epochs=2, warmup_factor=0.0), 111)
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(2.0)
    assert lrs[60] == pytest.approx(1.0)  # halfway through the cosine
    assert lrs[110] == pytest.approx(0.0, abs=1e-12)
    assert all(b <= a for a, b in itertools.pairwise(lrs[10:]))


def test_param_groups_exclude_biases_and_norm_scales() -> None:
    from ssd_lightning.models import L2Norm

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), L2Norm(8), torch.nn.Conv2d(8, 4, 1)
    )
    decay, no_decay = param_groups(net, no_decay_bias_norm=True)
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert len(no_decay["params"]) == 5 and no_decay["weight_decay"] == 0.0
    (everything,) = param_groups(net, no_decay_bias_norm=False)
    assert len(everything["params"]) == 7


def test_linear_lr_scaling() -> None:
    assert scaled_lr(1e-3, 256, 32) == pytest.approx(8e-3)
    assert scaled_lr(1e-3, 256, None) == 1e-3
    assert math.isclose(scaled_lr(2e-3, 16, 32), 1e-3)
