"""Test setup: 8 fake CPU devices (set before JAX is imported) and shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: longer than a few seconds; excluded by default")


@pytest.fixture(scope="session")
def ml100k_path():
  """The real MovieLens 100K folder (RALLREC_ML100K, else ../shared/data/ml-100k)."""
  path = Path(os.environ.get("RALLREC_ML100K", REPO.parent / "shared" / "data" / "ml-100k"))
  if not (path / "u.data").is_file():
    pytest.skip(f"MovieLens 100K not found at {path} (set RALLREC_ML100K)")
  return path
