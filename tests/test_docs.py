"""Every command the README and the config comments show composes and builds, so the
documentation cannot rot: ``ssd-train`` runs compose and build their network and default boxes,
multiruns compose and build every job (the launch check), the other tools compose their config."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

import ssd_lightning.anchors_cli
import ssd_lightning.data_cli  # noqa: F401  (registers the data_check entry config)
from ssd_lightning.config import CONFIG_DIR, check_required
from ssd_lightning.sweep_report import main as sweep_report_main
from ssd_lightning.sweeps import check_sweep, fingerprint

REPO = Path(__file__).resolve().parents[1]
CONFIG_NAMES = {
    "ssd-train": "train",
    "ssd-eval": "eval",
    "ssd-anchors": "anchor_coverage",
    "ssd-data": "data_check",
    "ssd-predict": "predict",
    "ssd-export": "export",
}
TOOL = re.compile(r"^(?:srun\s+)?(?:\.venv/bin/)?(ssd-[a-z-]+)\s(.*)$")
MODULE = re.compile(r"^torchrun\s.*-m ssd_lightning\.train\s(.*)$")


def _commands_in_readme() -> list[str]:
    lines, inside = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            inside = line.strip() in ("```bash", "```sh")
            continue
        if inside:
            lines.append(line)
    return _joined(lines)


def _commands_in_configs() -> list[str]:
    lines = []
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        for line in path.read_text().splitlines():
            match = re.match(r"\s*#\s{2,}(.*)$", line)  # an indented example in a comment
            lines.append(match.group(1) if match else "")
    return _joined(lines)


def _joined(lines: list[str]) -> list[str]:
    """Lines with their backslash continuations joined, comments cut, placeholders filled."""
    commands, current = [], ""
    for line in lines:
        current += " " + line.strip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        text = re.sub(r"\s#\s.*$", "", current).strip()
        text = re.sub(r"<[^>]*>", "X", text).replace("=...", "=/data/x").replace(" ...", "")
        if TOOL.search(text) or MODULE.search(text) or text.startswith("make train"):
            commands.append(text)
        current = ""
    return commands


COMMANDS = sorted(set(_commands_in_readme() + _commands_in_configs()))


def test_the_documents_show_every_tool() -> None:
    shown = {m.group(1) for c in COMMANDS if (m := TOOL.search(c))}
    assert set(CONFIG_NAMES) | {"ssd-sweep-report"} <= shown
    assert any("dry_run=true" in c for c in COMMANDS) and any("retry_failed" in c for c in COMMANDS)


def _parse(command: str) -> tuple[str, list[str]]:
    """(tool, its arguments) of a documented command line."""
    if command.startswith("make train"):
        args = re.search(r'ARGS="([^"]*)"', command)
        return "ssd-train", shlex.split(args.group(1)) if args else []
    if match := MODULE.search(command):
        return "ssd-train", shlex.split(match.group(1))
    match = TOOL.search(command)
    return match.group(1), shlex.split(match.group(2))


def _is_sweep(override: str) -> bool:
    """A Hydra sweep override (``a=1,2``, ``range(...)``, ``choice(...)``), by Hydra's parser."""
    return OverridesParser.create().parse_overrides([override])[0].is_sweep_override()


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_command_composes_and_builds(command: str, tmp_path: Path) -> None:
    tool, args = _parse(command)
    if tool == "ssd-sweep-report":
        report_dir = tmp_path / "multi" / "0" / ".hydra"
        report_dir.mkdir(parents=True)
        (report_dir / "overrides.yaml").write_text("- seed=1\n")
        sweep_report_main([str(tmp_path / "multi")])  # the folder argument is all it takes
        return
    multirun = "-m" in args
    overrides = [a for a in args if a != "-m"]
    if "data=yolo" in overrides and not any(o.startswith("data.class_names=") for o in overrides):
        root = tmp_path / "yolo"  # the dataset's own data.yaml names the classes
        root.mkdir()
        (root / "data.yaml").write_text("names: [cat, dog]\n")
        overrides = [o for o in overrides if not o.startswith("data.root=")] + [f"data.root={root}"]
    sweeps = [o for o in overrides if multirun and _is_sweep(o)]
    fixed = [o for o in overrides if o not in sweeps]
    fixed.append(f"hydra.sweep.dir={tmp_path / 'multi'}" if multirun else "hydra.run.dir=.")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(CONFIG_NAMES[tool], overrides=fixed, return_hydra_config=True)
        if multirun:
            with open_dict(cfg):
                cfg.hydra.overrides.task = [*cfg.hydra.overrides.task, *sweeps]
            check_sweep(cfg)  # composes and builds every job (None: Optuna chooses its own)
        elif tool == "ssd-train":
            with open_dict(cfg):
                cfg.paths.output_dir = str(tmp_path)
            check_required(cfg)
            assert fingerprint(cfg)["parts"]["default_boxes"]["num_boxes"] > 0
