"""Multi-process training on CPU (gloo): DDP inside Hydra runs and sweeps, torchrun "nodes",
and the loss normalisation across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd_lightning.config import compose_config
from ssd_lightning.data.datamodule import ssd_collate
from ssd_lightning.ddp import _free_port
from ssd_lightning.evaluate import evaluate

WORKER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_ddp import grads_of_half_batch
rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
url = f"tcp://127.0.0.1:{{port}}"
dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world)
torch.save(grads_of_half_batch(rank, world), out)
dist.destroy_process_group()
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(key, None)
    return env


def _tiny_args(tmp_path: Path, cache_dir: Path) -> list[str]:
    return [
        "experiment=tiny",
        "data.shapes.num_val=15",  # odd: a padding sampler would evaluate one image twice
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.cache_dir={cache_dir}",
    ]


def grads_of_half_batch(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Gradients of this rank's share of a fixed batch of 8 images, loss from SSDModule."""
    from test_module import BoxesDataset, make_module, tiny_net

    module = make_module(tiny_net(batch_norm=False))  # no BatchNorm: per-rank statistics
    samples = [BoxesDataset(module.box_coder, 8)[i] for i in range(8)]
    batch = ssd_collate(samples[rank::world])
    losses, _ = module._losses(batch)
    losses["loss"].backward()
    grads = {name: p.grad.clone() for name, p in module.net.named_parameters()}
    return {"grads": grads, "losses": {k: v.detach() for k, v in losses.items()}}


def test_loss_normalisation_makes_ddp_match_one_process(tmp_path: Path) -> None:
    """Averaged over 2 ranks (as DDP does), gradients and losses equal the one-process ones."""
    tests = str(Path(__file__).parent)
    sys.path.insert(0, tests)
    single = grads_of_half_batch(0, 1)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=tests))
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", port, str(tmp_path / f"{r}.pt")],
            env=_env(),
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for name, grad in single["grads"].items():
        mean = (ranks[0]["grads"][name] + ranks[1]["grads"][name]) / 2
        torch.testing.assert_close(mean, grad, rtol=1e-4, atol=1e-6)
    for key, value in single["losses"].items():
        torch.testing.assert_close((ranks[0]["losses"][key] + ranks[1]["losses"][key]) / 2, value)


def test_ddp_two_cpu_processes_in_a_hydra_sweep(tmp_path: Path, cache_dir: Path) -> None:
    """`trainer=ddp_cpu` inside `--multirun`: one folder per job, each trained by 2 ranks,
    validation over the whole set exactly once (equal to a one-process evaluation)."""
    result = subprocess.run(
        [
            sys.executable, "-m", "ssd_lightning.train", "-m", "trainer=ddp_cpu",
            "loss.neg_pos_ratio=2,3", *_tiny_args(tmp_path, cache_dir),
        ],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    sweeps = list((tmp_path / "logs" / "tiny" / "multiruns").iterdir())
    assert len(sweeps) == 1, "the sweep ran more than once"
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    assert not (tmp_path / "logs" / "tiny" / "runs").exists()
    assert output.count("MEMBER: 2/2") == 2  # rank 1 of each job
    for job in jobs:
        assert (job / "ddp" / "config.yaml").is_file()
        metrics = json.loads((job / "metrics.json").read_text())
        checkpoint = torch.load(metrics["last_checkpoint"], weights_only=True)
        assert checkpoint["global_step"] == 2  # 32 images / (8 per rank x 2 ranks)
        cfg = compose_config(
            [*_tiny_args(tmp_path, cache_dir), f"ckpt_path={metrics['last_checkpoint']}"],
            config_name="eval",
            output_dir=tmp_path / "eval",
        )
        single = evaluate(cfg)
        for key in ("mAP", "mAP_50", "mAP_voc07"):
            assert metrics[f"val/{key}"] == pytest.approx(single[key], abs=1e-6), key


def test_torchrun_two_nodes_over_loopback(tmp_path: Path, cache_dir: Path) -> None:
    """Two torchrun "nodes" of one CPU process each: one run folder, written by rank 0."""
    port = str(_free_port())
    args = [
        *_tiny_args(tmp_path, cache_dir),
        "trainer=multinode",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "trainer.sync_batchnorm=false",
        "module.channels_last=false",
        "data.num_workers=0",
        "data.pin_memory=false",
    ]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={node}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "ssd_lightning.train",
                *args,
            ],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    runs = list((tmp_path / "logs" / "tiny" / "runs").iterdir())
    assert len(runs) == 1
    assert "validation mAP" in outputs[0]
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    # 32 images / (8 per rank x 2 ranks): both "nodes" trained together.
    assert torch.load(metrics["last_checkpoint"], weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]  # rank 1 wrote nothing
