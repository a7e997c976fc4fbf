from pathlib import Path

import pytest

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
