from pathlib import Path

import pytest
from omegaconf import DictConfig

from ssd_lightning.config import compose_config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset not available: {path} is absent")
    return path


@pytest.fixture
def bccd_root() -> Path:
    return shared_dataset("bccd")


@pytest.fixture
def coco128_root() -> Path:
    return shared_dataset("coco128")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated shapes data shared by all runs of the session (per xdist worker)."""
    return tmp_path_factory.mktemp("cache")


def tiny_config(out: Path, cache: Path, *overrides: str, name: str = "train") -> DictConfig:
    """The tiny experiment writing into ``out`` (tests import this from conftest)."""
    return compose_config(
        [
            "experiment=tiny",
            f"paths.log_dir={out / 'logs'}",
            f"paths.cache_dir={cache}",
            "trainer.enable_progress_bar=false",
            *overrides,
        ],
        config_name=name,
        output_dir=out,
    )
