"""Every sweep on every experiment changes what it sweeps; duplicates are refused at launch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from ssd_lightning.config import CONFIG_DIR, compose_config
from ssd_lightning.sweeps import DuplicateRunsError, check_sweep, duplicate_groups, fingerprint

SWEEPS = sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml") if p.stem != "optuna")
EXPERIMENTS = ["tiny", "quickstart", "bccd", "voc0712_ssd300", "coco_ssd300"]
ROOT = {"bccd": "/data/bccd", "voc0712_ssd300": "/data/voc", "coco_ssd300": "/data/coco"}


def multirun_config(*overrides: str, sweep: tuple[str, ...] = ()):
    """The config a multirun's launching process sees: the hydra node, ``sweep`` overrides
    (``key=a,b``) among its task overrides as the command line puts them."""
    cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task = [*cfg.hydra.overrides.task, *sweep]
    return cfg


def test_every_sweep_file_is_in_the_matrix() -> None:
    assert {"anchors", "anchor_tables", "aspect_ratios", "anchor_clip", "neg_pos", "demo"} <= set(
        SWEEPS
    )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_job_builds_and_trains_something_of_its_own(sweep: str, experiment: str) -> None:
    """Compose each job as ssd-train would, build its network (meta device) and default boxes:
    no two jobs of the sweep may train the same thing (default boxes, loss, data, schedule)."""
    root = [f"data.root={ROOT[experiment]}"] if experiment in ROOT else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = multirun_config(f"experiment={experiment}", f"+sweep={sweep}", *root)
        prints = check_sweep(cfg)  # raises on a duplicate or a job that cannot be built
    assert prints is not None and len(prints) >= 2
    assert len({p["id"] for p in prints}) == len(prints)
    if sweep in ("anchors", "anchor_tables", "aspect_ratios", "anchor_clip", "demo"):
        boxes = [p["parts"]["default_boxes"]["sha256"] for p in prints]
        distinct = len(set(boxes))
        assert distinct == (2 if sweep == "demo" else len(prints))  # demo: 2 s_min x 2 neg:pos


def test_anchor_sweep_on_the_coco_recipe_trains_six_anchor_settings(capsys) -> None:
    """The paper recipes used to train one set of boxes six times (the size table won)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = multirun_config(
            "experiment=coco_ssd300", "data.root=/data/coco", "+sweep=anchors", "dry_run=true"
        )
        prints = check_sweep(cfg)
    sizes = {tuple(p["parts"]["default_boxes"]["sizes_px"]) for p in prints}
    assert len(sizes) == 6 and all(s[0] == 21.0 for s in sizes)  # the first map keeps 7%
    plan = capsys.readouterr().out
    assert plan.startswith("6 jobs, 6 distinct fingerprints:") and "anchors.s_min=0.15" in plan


def test_overrides_that_change_nothing_are_refused_by_name() -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        sweep = ("anchors.s_min=0.1,0.2", "data.num_workers=0,1")
        with pytest.raises(DuplicateRunsError) as error:
            check_sweep(multirun_config("experiment=tiny", sweep=sweep))
        seeds = ("anchors.s_min=0.1,0.2", "seed=1,2")  # replicates: allowed
        assert len(check_sweep(multirun_config("experiment=tiny", sweep=seeds))) == 4
        allowed = multirun_config("experiment=tiny", "allow_duplicate_runs=true", sweep=sweep)
        assert len(check_sweep(allowed)) == 4
        bad = multirun_config("experiment=tiny", sweep=("anchors.aspect_ratios=paper,[[2],[2]]",))
        with pytest.raises(
            ValueError,
            match=r"sweep job #1 \(experiment=tiny anchors.aspect_ratios=\[\[2\],\[2\]\]\) cannot",
        ):
            check_sweep(bad)
    message = str(error.value)
    assert "jobs #0, #1 train the same thing" in message and "jobs #2, #3" in message
    assert "data.num_workers change nothing here" in message


def test_replicates_differ_only_in_seed() -> None:
    jobs = [["a=1", "seed=1"], ["a=1", "seed=2"], ["a=2", "b=1"], ["a=2", "b=2"]]
    assert duplicate_groups(jobs, ["x", "x", "y", "y"]) == [([2, 3], ["b"])]


def test_fingerprint_ignores_seed_and_loaders_but_not_what_is_trained(tmp_path: Path) -> None:
    def fp(*overrides: str) -> str:
        return fingerprint(compose_config(["experiment=tiny", *overrides], output_dir=tmp_path))[
            "id"
        ]

    base = fp()
    assert fp("seed=7", "data.num_workers=3", "trainer.log_every_n_steps=5") == base
    changes = ["anchors.s_min=0.3", "loss.neg_pos_ratio=5", "optim.optimizer.lr=0.5"]
    changes += ["data.augment.flip_p=0.0", "trainer.max_epochs=9", "module.iou_threshold=0.4"]
    for change in changes:
        assert fp(change) != base, change


def test_cli_dry_run_prints_the_plan_and_trains_nothing(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "ssd_lightning.train", "-m", "experiment=coco_ssd300",
        "data.root=/nonexistent", "+sweep=anchors", "dry_run=true", f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path / 'multi'}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "6 jobs, 6 distinct fingerprints" in done.stdout
    assert not (tmp_path / "multi" / "0").exists()
    refused = subprocess.run(
        [*command[:-2], "anchors.s_min=0.1", "data.num_workers=1,2", "dry_run=false"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 1 and "data.num_workers change nothing here" in refused.stderr
    assert "DuplicateRunsError" in refused.stderr and "Launching" not in refused.stderr
    assert not (tmp_path / "multi" / "0").exists()  # no job started


def test_relaunch_is_checked_against_the_sweep_folder(tmp_path: Path, capsys) -> None:
    """Re-launching into a sweep folder: the jobs found are described; job folders that hold
    runs of other settings are refused before any job starts."""
    from ssd_lightning.runs import RunFolderMismatchError

    sweep = ("loss.neg_pos_ratio=1,2",)
    folder = f"hydra.sweep.dir={tmp_path}"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        prints = check_sweep(multirun_config("experiment=tiny", folder, sweep=sweep))
        (tmp_path / "0").mkdir()
        status = {"status": "finished", "fingerprint": prints[0]["id"], "seed": 42}
        (tmp_path / "0" / "job_status.json").write_text(json.dumps(status))
        dry = multirun_config("experiment=tiny", folder, "dry_run=true", sweep=sweep)
        check_sweep(dry)
        assert "1 finished: skipped; 1 new: started" in capsys.readouterr().out
        with pytest.raises(RunFolderMismatchError, match=r"job #0 .*fingerprint"):
            check_sweep(
                multirun_config("experiment=tiny", folder, sweep=("loss.neg_pos_ratio=3,2",))
            )
        with pytest.raises(RunFolderMismatchError, match=r"job #0 .*seed 42 there, 7 here"):
            check_sweep(multirun_config("experiment=tiny", folder, "seed=7", sweep=sweep))
