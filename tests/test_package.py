"""The installable package: console scripts and dependencies as pyproject.toml declares them."""
import importlib
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _project():
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_console_scripts_name_the_module_entry_points():
  scripts = _project()["scripts"]
  assert set(scripts) == {"rallrec", "rallrec-bench", "rallrec-report"}
  for target in scripts.values():
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function)), target


def _installed():
  try:
    return importlib.metadata.distribution("rallrec-jax")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("rallrec-jax is not installed (pip install -e .)")


def test_installed_dependencies_are_the_pinned_requirements():
  dist = _installed()
  pinned = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
  assert sorted(dist.requires) == sorted(pinned)


def test_rallrec_command_runs_outside_the_repository(tmp_path):
  _installed()
  script = Path(sys.executable).parent / "rallrec"
  result = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          check=False, timeout=300)
  assert result.returncode == 0, result.stderr
  assert re.search(r"^  finetune +instruction tuning", result.stdout, re.M), result.stdout
  assert "--workdir" in result.stdout
  missing = subprocess.run([str(script), "--config", "configs/nosuch.py", "--workdir", "w"],
                           cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300)
  assert missing.returncode != 0 and not (tmp_path / "w").exists()
