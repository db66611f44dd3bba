"""Test setup (set before JAX is imported) and shared fixtures.

8 fake CPU devices. Compilation is most of a test's time on a CPU, so XLA's backend runs at
optimization level 0 (the tests' programs are tiny) and every program compiled for more than
0.2 s lands in one persistent cache for the session (its children included), so that a program
rebuilt by a later test or a child process is read back instead of compiled again.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rallrec_jax_test_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

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
