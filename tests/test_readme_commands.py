"""The README's commands, copied literally, work from a fresh clone after its set-up command.

The commands come from README.md itself, from its shell code blocks (fenced blocks without a
language, or marked bash / sh / shell; ```python blocks are Python, not commands). In them:

- a line ending in `\\` continues on the next line; a `#` after whitespace starts a comment,
  and a line that is only a comment is skipped;
- a command is a line whose first word is a program a reader runs (`PROGRAMS`); the rest are
  outputs (`{"bench": ...}`), the module tree or shell variables for the commands below them;
- the set-up command is the one starting with `SETUP`: it installs the package into a venv,
  activates it and runs the quickstart (the part after `ACTIVATE`);
- a command with a placeholder (`PLACEHOLDERS`: W, W1, `...`, CONFIG, optional `[...]`,
  `$VARIABLES`, a downloaded dataset or model) is a template for the reader's own values, not
  a literal command;
- of the literal commands, those in `EXCLUDED` are left out for the reason given there (a
  download, an accelerator, or more than a few minutes on 2 CPU cores); every other one must
  start with a `RUNNABLE` prefix, and the test runs it.

The slow test clones the checkout (committed files only) and stands in for the set-up
command's installation, which would download GBs: the current interpreter's bin folder and
small wrappers for the console scripts of pyproject.toml (`rallrec` runs
`python -m rallrec_jax.main`, ...) go first on PATH and the clone on PYTHONPATH, so `python`
and the commands run the clone's code. It then runs, each through `bash -c` in the clone, the
quickstart, the report command its closing line names, and every runnable command in README
order, and checks that each exits 0. The quickstart takes 5-8 minutes on 2 CPU cores:

  python -m pytest -q -m slow tests/test_readme_commands.py
"""
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = "python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e ."
ACTIVATE = " && . .venv/bin/activate && "
QUICKSTART_WORKDIR = "workdirs/quickstart"
SHELL_BLOCKS = ("", "bash", "sh", "shell")
PROGRAMS = ("python", "python3", "rallrec", "rallrec-bench", "rallrec-report", "bash", "sbatch",
            "sha256sum")
RUNNABLE = ("python -m rallrec_jax.", "rallrec", "python launch/")
PLACEHOLDERS = {
    r"(^|\s)W(\d|_\w+)?(\s|$)": "a workdir of the reader's (W, W1, W_simple)",
    r"\.\.\.": "more arguments of the reader's",
    r"CONFIG": "a config of the reader's",
    r"\[": "optional arguments",
    r"\$": "shell variables the reader sets",
    r"/data/|/models/|ml-1m|ml-100k": "a downloaded dataset or model",
}
# Literal commands the test does not run, each with the reason.
EXCLUDED = {
    "python3 -m venv .venv && .venv/bin/pip install -q -r requirements-test.txt -e . && "
    ".venv/bin/python -m pytest -q -n 2":
        "installs the test requirements and runs the whole default suite (about 10 minutes)",
    "python -m rallrec_jax.bench llm": "needs SmolLM2-135M downloaded, and PyTorch",
    "python -m rallrec_jax.bench llm-accel": "a ~1B model for a GPU or TPU",
    "python -m rallrec_jax.bench compile": "compiles an 8B decoder's training step and scorer "
                                           "in both layouts: minutes on 2 cores",
    "python -m rallrec_jax.bench lightgcn": "needs ML-100K; LightGCN on 1M interactions takes "
                                            "about 8 minutes",
    "python -m rallrec_jax.bench index": "exact search of 1M x 128 vectors takes minutes",
    "python -m rallrec_jax.bench retrieve": "the reference retrieval of 1M samples takes 1.5 "
                                            "minutes, with ours and the data more",
    "python -m rallrec_jax.bench retrieval-quality": "needs ML-100K",
}
CONSOLE_SCRIPTS = {"rallrec": "rallrec_jax.main:run", "rallrec-bench": "rallrec_jax.bench:main",
                   "rallrec-report": "rallrec_jax.report:main"}
CLOSING_LINE = (f"results: {QUICKSTART_WORKDIR}/eval/best/ ; "
                f"report: rallrec-report {QUICKSTART_WORKDIR}")


def shell_lines(readme):
  """The lines of the README's shell code blocks, continuations joined, comments removed."""
  lines, block, pending = [], None, ""
  for raw in readme.splitlines():
    fence = re.match(r"\s*```(\w*)\s*$", raw)
    if fence:
      block = None if block is not None else fence.group(1)
      pending = ""
      continue
    if block not in SHELL_BLOCKS:
      continue
    if raw.rstrip().endswith("\\"):
      pending += raw.rstrip()[:-1].rstrip() + " "
      continue
    line = re.sub(r"(^|\s+)#.*$", "", pending + raw.strip()).strip()
    pending = ""
    if line:
      lines.append(re.sub(r"\s+", " ", line))
  return lines


def commands(readme):
  return [line for line in shell_lines(readme) if line.split()[0] in PROGRAMS]


def placeholders(command):
  return [why for pattern, why in PLACEHOLDERS.items() if re.search(pattern, command)]


def classify(readme):
  """(the set-up command, templates, excluded, runnable commands in README order)."""
  setup, templates, excluded, runnable = [], [], [], []
  for command in commands(readme):
    if command.startswith(SETUP):
      setup.append(command)
    elif placeholders(command):
      templates.append(command)
    elif command in EXCLUDED:
      excluded.append(command)
    else:
      runnable.append(command)
  assert len(setup) == 1, f"one set-up command starting {SETUP!r}, found {setup}"
  return setup[0], templates, excluded, runnable


def test_readme_commands_are_each_decided():
  setup, templates, excluded, runnable = classify((REPO / "README.md").read_text())
  assert ACTIVATE in setup
  assert setup.split(ACTIVATE, 1)[1] == (
      f"rallrec --config configs/quickstart.py --workdir {QUICKSTART_WORKDIR}")
  assert set(excluded) == set(EXCLUDED), "a README command needs a decision: run or exclude it"
  undecided = [c for c in runnable if not c.startswith(RUNNABLE)]
  assert not undecided, f"neither a template, excluded nor runnable: {undecided}"
  assert "python -m rallrec_jax.main --help" in runnable
  assert f"python -m rallrec_jax.report {QUICKSTART_WORKDIR}" in runnable
  assert templates, "the README's templates (W, CONFIG, ...) were not found"
  for command in runnable:
    words = shlex.split(command)
    takes = [w for w, flag in zip(words[1:], words) if flag == "--workdir"]
    assert takes in ([], [QUICKSTART_WORKDIR]), f"{command}: runs on another workdir"
    if words[:3] == ["python", "-m", "rallrec_jax.report"]:
      assert words[3:] == [QUICKSTART_WORKDIR], f"{command}: reports another workdir"


def wrappers(bin_dir):
  """Console-script stand-ins for pyproject.toml's [project.scripts], in `bin_dir`."""
  scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
  assert scripts == CONSOLE_SCRIPTS
  bin_dir.mkdir()
  for name, target in scripts.items():
    module = target.split(":")[0]
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\nexec python -m {module} "$@"\n')
    path.chmod(0o755)


def bash(command, cwd, env, timeout):
  result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False, timeout=timeout)
  assert result.returncode == 0, (
      f"{command}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
  return result


@pytest.mark.slow
def test_readme_commands_run_from_a_fresh_clone(tmp_path):
  clone = tmp_path / "clone"
  subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=300)
  setup, _, _, runnable = classify((clone / "README.md").read_text())
  wrappers(tmp_path / "bin")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "VIRTUAL_ENV")}
  env["PATH"] = os.pathsep.join(
      [str(tmp_path / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")])
  env["PYTHONPATH"] = str(clone)
  where = bash('python -c "import rallrec_jax; print(rallrec_jax.__file__)"', clone, env, 300)
  assert Path(where.stdout.strip()).is_relative_to(clone)

  quickstart = bash(setup.split(ACTIVATE, 1)[1], clone, env, 3600).stdout
  assert re.search(r"^split\s+AUC\s+LogLoss", quickstart, re.M), quickstart
  assert re.search(r"^test\s+0\.\d{4}", quickstart, re.M), quickstart
  assert "baseline: " in quickstart
  assert quickstart.rstrip().splitlines()[-1] == CLOSING_LINE
  assert (clone / QUICKSTART_WORKDIR / "eval" / "best" / "test.json").is_file()
  bash(CLOSING_LINE.split(" ; report: ", 1)[1], clone, env, 600)

  for command in runnable:
    bash(command, clone, env, 600)
  assert (clone / "report" / "report.md").is_file()
