"""Launchers (TPU VM, GPU hosts, SLURM) and sweeps: dry runs, expansion, flags, done runs."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest
from absl import flags
from ml_collections import config_flags

from rallrec_jax import config as config_lib
from rallrec_jax import sweep as sweep_lib
from tests.conftest import REPO

CONFIGS = ("quickstart", "ml100k", "ml1m", "bookcrossing", "amazon_movies")
TRICKY = ["--config.data.split=(0.8,0.1,0.1)", "it's a b"]
MAIN = ["python", "-m", "rallrec_jax.main", "--config", "configs/ml1m.py:path=/data/ml-1m",
        "--workdir", "/tmp/w"]


def fake_tools(tmp_path, **scripts):
  """A PATH whose first folder holds the given fake commands (name -> bash body)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name, body in scripts.items():
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)
  return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def run(args, path=None, cwd=REPO, env=None):
  env = dict(os.environ, **(env or {}))
  if path:
    env["PATH"] = path
  return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
                        check=False)


def commands(stdout):
  """The shell-quoted command lines of a dry run, split into argv lists (comments skipped)."""
  return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


# A fake gcloud that records any call: a dry run must make none.
def tpu_dry_run(tmp_path, *flags_, command=()):
  marker = tmp_path / "gcloud_called"
  path = fake_tools(tmp_path, gcloud=f"touch {marker}; exit 99")
  result = run(["bash", "launch/tpu_vm.sh", "--dry-run", "--name", "rr", "--zone",
                "us-central2-b", "--project", "p", *flags_, *(["--", *command] if command else [])],
               path=path)
  assert not marker.exists()
  return result


def test_tpu_vm_dry_run_prints_every_gcloud_command(tmp_path):
  result = tpu_dry_run(tmp_path, "--type", "v5litepod-8", "--create", "--spot", "--delete",
                       "--fetch-logs", "out", command=MAIN + TRICKY)
  assert result.returncode == 0, result.stderr
  lines = commands(result.stdout)
  assert all(line[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for line in lines)
  assert [line[4] for line in lines] == ["create", "scp", "ssh", "ssh", "scp", "delete"]
  create, copy, setup, launch, fetch, delete = lines
  assert create[5] == "rr" and "--spot" in create
  assert create[create.index("--accelerator-type") + 1] == "v5litepod-8"
  assert create[create.index("--version") + 1] == "tpu-ubuntu2204-base"
  for line in lines:
    assert line[line.index("--zone") + 1] == "us-central2-b"
    assert line[line.index("--project") + 1] == "p"
  for line in (copy, setup, launch, fetch):
    assert "--worker=all" in line
  assert copy[6] == "rr:rallrec_jax.tar.gz"
  assert "bash launch/setup_host.sh tpu" in setup[setup.index("--command") + 1]
  remote = launch[launch.index("--command") + 1]
  assert "export RALLREC_DISTRIBUTED=1" in remote and ". .venv/bin/activate" in remote
  user = remote.split("nohup ", 1)[1].split(" > logs/run-$(hostname).log", 1)[0]
  assert shlex.split(user) == MAIN + TRICKY
  assert fetch[5:8] == ["--recurse", "rr:rallrec_jax/logs", "out"]
  assert delete[5] == "rr" and "--quiet" in delete


def test_tpu_vm_runs_only_the_steps_asked_for(tmp_path):
  result = tpu_dry_run(tmp_path, command=MAIN)
  assert result.returncode == 0, result.stderr
  lines = commands(result.stdout)
  assert [line[4] for line in lines] == ["scp", "ssh", "ssh"]
  assert not any("--spot" in line for line in lines)
  only_delete = commands(tpu_dry_run(tmp_path, "--delete").stdout)
  assert [line[4] for line in only_delete] == ["delete"]


@pytest.mark.parametrize("args, message", [
    (["--name", "rr", "--project", "p", "--", "python"], "missing --zone"),
    (["--name", "rr", "--zone", "z", "--project", "p", "--create"], "--type"),
    (["--name", "rr", "--zone", "z", "--project", "p"], "nothing to do"),
    (["--name", "rr", "--zone", "z", "--project", "p", "--bogus"], "unknown argument"),
])
def test_tpu_vm_usage_errors(args, message):
  result = run(["bash", "launch/tpu_vm.sh", "--dry-run", *args])
  assert result.returncode == 2
  assert message in result.stderr and "usage:" in result.stderr


def test_tpu_vm_fetches_logs_and_deletes_after_a_failed_run(tmp_path):
  calls = tmp_path / "calls"
  path = fake_tools(tmp_path, gcloud=f'echo "$*" >> {calls}\n'
                    'case "$*" in *RALLREC_DISTRIBUTED*) exit 3 ;; esac')
  result = run(["bash", "launch/tpu_vm.sh", "--name", "rr", "--zone", "z", "--project", "p",
                "--fetch-logs", str(tmp_path / "logs"), "--delete", "--", "python", "-V"],
               path=path, env={"TMPDIR": str(tmp_path)})
  assert result.returncode == 3
  assert "failed (exit 3)" in result.stderr
  steps = [line.split()[3] for line in calls.read_text().splitlines()]
  assert steps == ["scp", "ssh", "ssh", "scp", "delete"]
  assert not list(tmp_path.glob("*.tar.gz"))


def test_tpu_vm_copies_tracked_files_only_and_names_the_untracked(tmp_path):
  checkout = tmp_path / "checkout"
  (checkout / "launch").mkdir(parents=True)
  for name in ("tpu_vm.sh", "common.sh"):
    shutil.copy(REPO / "launch" / name, checkout / "launch" / name)
  (checkout / ".gitignore").write_text("*.log\n")
  (checkout / "tracked.py").write_text("")
  (checkout / "gone.py").write_text("")
  git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t"]
  for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "files"]):
    subprocess.run(git + args, check=True, capture_output=True)
  (checkout / "gone.py").unlink()
  (checkout / "notes.txt").write_text("")
  (checkout / "scratch").mkdir()
  (checkout / "scratch" / "a.py").write_text("")
  (checkout / "run.log").write_text("")
  copied = tmp_path / "copied.tar.gz"
  path = fake_tools(tmp_path, gcloud=f'if [ "$4" = scp ]; then cp "$5" {copied}; fi')
  args = ["bash", str(checkout / "launch" / "tpu_vm.sh"), "--name", "rr", "--zone", "z",
          "--project", "p", "--", "python", "-V"]
  result = run(args, path=path, env={"TMPDIR": str(tmp_path)})
  assert result.returncode == 0, result.stderr
  with tarfile.open(copied) as tar:
    assert sorted(tar.getnames()) == [".gitignore", "launch/common.sh", "launch/tpu_vm.sh",
                                      "tracked.py"]
  warning = ("warning: not copied, as git does not track them (git add what the run needs): "
             "notes.txt scratch/")
  assert result.stderr.splitlines() == [warning]
  dry = run(args[:2] + ["--dry-run"] + args[2:], path=path)
  assert dry.returncode == 0 and dry.stderr.splitlines() == [warning]
  assert f"# pack: git ls-files in {checkout} -> " in dry.stdout


def test_gpu_hosts_dry_run_one_process_per_host():
  hosts = ["gpu1", "me@gpu2", "gpu3"]
  result = run(["bash", "launch/gpu_hosts.sh", "--dry-run", "--hosts", ",".join(hosts),
                "--port", "4321", "--", *MAIN, *TRICKY])
  assert result.returncode == 0, result.stderr
  lines = commands(result.stdout)
  assert len(lines) == 3 * len(hosts)
  copies, setups, launches = lines[:3], lines[3:6], lines[6:]
  for i, host in enumerate(hosts):
    assert copies[i][0] == "rsync" and copies[i][-1] == f"{host}:rallrec_jax/"
    assert setups[i][:4] == ["ssh", "-o", "BatchMode=yes", host]
    assert setups[i][4] == "cd rallrec_jax && bash launch/setup_host.sh cuda12"
    assert launches[i][:4] == ["ssh", "-o", "BatchMode=yes", host]
    bash, inner = shlex.split(launches[i][4])[:-1], shlex.split(launches[i][4])[-1]
    assert bash == ["bash", "-o", "pipefail", "-c"]
    env = dict(w.split("=", 1) for w in inner.split("export ", 1)[1].split(" && ")[0].split())
    assert env == {"RALLREC_DISTRIBUTED": "1", "RALLREC_COORDINATOR": "gpu1:4321",
                   "RALLREC_NUM_PROCESSES": "3", "RALLREC_PROCESS_ID": str(i),
                   "PYTHONUNBUFFERED": "1"}
    user = inner.split(" && ")[-1].rsplit(" 2>&1 | tee logs/run.log", 1)[0]
    assert shlex.split(user) == MAIN + TRICKY


def test_gpu_hosts_names_the_host_that_failed(tmp_path):
  path = fake_tools(tmp_path, rsync="exit 0", ssh='case "$4" in '
                    '*RALLREC_PROCESS_ID=1*) echo boom; exit 7 ;; esac')
  result = run(["bash", "launch/gpu_hosts.sh", "--hosts", "gpu1,gpu2,gpu3", "--", "python"],
               path=path)
  assert result.returncode == 1
  assert "[gpu2] boom" in result.stdout
  assert "failed on gpu2 (process 1, exit 7)" in result.stderr


def test_gpu_hosts_usage_errors():
  for args, message in [([], "missing --hosts"), (["--hosts", "a,b"], "missing the command")]:
    result = run(["bash", "launch/gpu_hosts.sh", *args])
    assert result.returncode == 2 and message in result.stderr and "usage:" in result.stderr


def test_slurm_sbatch(tmp_path):
  script = REPO / "launch" / "slurm.sbatch"
  assert run(["bash", "-n", str(script)]).returncode == 0
  text = script.read_text()
  assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node" in text
  assert "srun" in text and "RALLREC_DISTRIBUTED=1" in text
  # With a fake srun that runs its command here: setup once per node, then the command.
  path = fake_tools(tmp_path, srun='echo "srun $*" >&2; shift; "$@"')
  checkout = tmp_path / "checkout"
  (checkout / "launch").mkdir(parents=True)
  (checkout / "launch" / "setup_host.sh").write_text('echo "setup $1"\n')
  result = run(["bash", str(script), "sh", "-c", "echo $RALLREC_DISTRIBUTED $JAX_LOCAL_DEVICE_IDS"],
               path=path, env={"SLURM_SUBMIT_DIR": str(checkout), "SLURM_GPUS_ON_NODE": "4"})
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == ["setup cuda12", "1 0,1,2,3"]
  assert run(["bash", str(script)]).returncode == 2


def ml1m_runs(root="/r"):
  return sweep_lib.expand("configs/ml1m.py:path=/data/ml-1m", root)


def test_ml1m_sweep_varies_one_factor_around_the_default(monkeypatch):
  monkeypatch.chdir(REPO)
  runs = ml1m_runs()
  default = config_lib.base_config()
  assert (default.mix.variant, default.retrieval.order, default.retrieval.k) == (
      "mix3", "rerank", 30)
  assert [r.overrides for r in runs].count({}) == 1 and runs[0].name == "default"
  names = [r.name for r in runs]
  assert len(set(names)) == len(names)
  assert len({json.dumps(r.overrides, sort_keys=True) for r in runs}) == len(runs)
  covered = {}
  for r in runs:
    factor = set(r.overrides) - {"finetune.variant"} or set(r.overrides)
    assert len(factor) <= 1, r.overrides
    for key in factor:
      covered.setdefault(key, {sweep_lib.get_value(default, key)}).add(r.overrides[key])
    if "retrieval.order" in r.overrides:
      assert r.overrides["finetune.variant"] == "rag"
  assert covered["mix.variant"] == set(config_lib.MIX_VARIANTS)
  assert covered["retrieval.order"] == set(config_lib.ORDERS)
  assert covered["retrieval.k"] == {5, 10, 15, 20, 25, 30}
  assert covered["finetune.pool_size"] == {256, 512, 1024, 2048, 4096, 8192}
  assert covered["finetune.variant"] >= {"simple", "rerank", "mixed"}
  assert len(runs) == 20


@pytest.mark.parametrize("name", CONFIGS)
def test_every_sweep_entry_applies_to_its_config(name, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  spec = f"configs/{name}.py" + ("" if name == "quickstart" else f":path={tmp_path}")
  module, cfg = sweep_lib.load(spec)
  entries = module.sweep()
  assert entries and entries[0] == {}
  for entry in entries:
    config_lib.validate(config_lib.apply_overrides(cfg, entry))
  runs = sweep_lib.expand(spec, tmp_path / "sweeps", check_paths=True)
  assert len(runs) == len(entries)


def test_dry_run_lines_parse_back_to_main_flags(monkeypatch):
  monkeypatch.chdir(REPO)
  spec = "configs/ml1m.py:path=/data/ml-1m"
  result = run([sys.executable, "launch/sweep.py", spec, "--dry-run", "--root", "/s"])
  assert result.returncode == 0, result.stderr
  lines = commands(result.stdout)
  by_workdir = {r.workdir: r for r in ml1m_runs("/s")}
  assert len(lines) == len(by_workdir) == 20
  for argv in lines:
    assert argv[:5] == ["python", "-m", "rallrec_jax.main", "--config", spec]
    assert argv[5] == "--workdir"
    expected = by_workdir.pop(argv[6])
    for flag in argv[7:]:
      assert flag.startswith("--config.")
      sweep_lib.get_value(expected.cfg, flag[len("--config."):].split("=")[0])
    assert parse_main_flags(argv[1:]).to_dict() == expected.cfg.to_dict()
  assert not by_workdir


def parse_main_flags(argv):
  """The config main.py would get from these arguments (its flags on a fresh FlagValues)."""
  argv = ["main"] + argv[argv.index("--config"):]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  flags.DEFINE_list("stages", None, "", flag_values=values)
  values(argv)
  return values.config


def test_rendered_values_parse_back(monkeypatch, tmp_path):
  monkeypatch.chdir(REPO)
  overrides = {"data.split": (0.9, 0.0, 0.1), "finetune.lora.targets": ("q_proj", "k_proj"),
               "retrieval.rerank_short": False, "finetune.lr": 1e-05, "retrieval.k": 7,
               "model.path": "/models/a b", "model.mesh": (("data", -1), ("tensor", 2))}
  _, cfg = sweep_lib.load("configs/quickstart.py")
  expected = config_lib.apply_overrides(cfg, overrides)
  r = sweep_lib.Run(sweep_lib.run_name(overrides), overrides, str(tmp_path), expected)
  argv = sweep_lib.command("configs/quickstart.py", r)
  assert parse_main_flags(shlex.split(shlex.join(argv))[1:]).to_dict() == expected.to_dict()
  name = sweep_lib.run_name(overrides)
  assert name == sweep_lib.run_name(dict(reversed(list(overrides.items()))))
  assert "/" not in name and " " not in name and "'" not in name
  assert sweep_lib.run_name({}) == "default"
  assert sweep_lib.run_name({"retrieval.k": 20, "mix.variant": "cf"}) == (
      "mix.variant=cf,retrieval.k=20")


def test_done_runs_are_skipped(monkeypatch, tmp_path):
  monkeypatch.chdir(REPO)
  root = tmp_path / "sweeps"
  runs = sweep_lib.expand("configs/quickstart.py", root)
  default = runs[0]
  assert tuple(default.cfg.eval.splits) == ("valid", "test")
  workdir = root / "default"
  (workdir / "manifests").mkdir(parents=True)
  (workdir / "eval" / "best").mkdir(parents=True)
  (workdir / "manifests" / "evaluate.json").write_text("{}")
  (workdir / "eval" / "best" / "test.json").write_text("{}")
  (workdir / "eval" / "valid.json").write_text("{}")  # another layout: not this run's
  assert not sweep_lib.done(workdir, default.cfg)   # best/valid.json is missing
  (workdir / "eval" / "best" / "valid.json").write_text("{}")
  assert sweep_lib.done(workdir, default.cfg)
  args = [sys.executable, "launch/sweep.py", "configs/quickstart.py", "--root", str(root)]
  lines = run(args + ["--dry-run"]).stdout.splitlines()
  assert len(lines) == len(runs) == 3
  assert lines[0].startswith("# skip (done): python -m rallrec_jax.main")
  assert not any(line.startswith("#") for line in lines[1:])
  forced = run(args + ["--dry-run", "--", "--force"]).stdout.splitlines()
  assert not any(line.startswith("#") for line in forced)
  result = run(args + ["--only", "default"])
  assert result.returncode == 0 and "skip (done): default" in result.stdout


def test_sweep_errors_name_the_entry_and_key(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  bad = tmp_path / "bad.py"
  bad.write_text("from rallrec_jax import config\n\n"
                 "def get_config(arg=None):\n  return config.base_config()\n\n"
                 "def sweep():\n  return [{}, {'retrieval.kk': 3}]\n")
  with pytest.raises(sweep_lib.SweepError, match=r"sweep entry 1 .*'retrieval.kk'"):
    sweep_lib.expand(str(bad), tmp_path)
  result = run([sys.executable, "launch/sweep.py", str(bad), "--dry-run"])
  assert result.returncode == 2 and "retrieval.kk" in result.stderr
  result = run([sys.executable, "launch/sweep.py", "configs/quickstart.py", "--dry-run", "--",
                "--config.retrieval.nope=1"])
  assert result.returncode == 2 and "retrieval.nope" in result.stderr
  result = run([sys.executable, "launch/sweep.py", "configs/ml1m.py:path=/nonexistent"])
  assert result.returncode == 2 and "data.path" in result.stderr


def test_sweep_hands_runs_to_the_tpu_launcher(monkeypatch):
  monkeypatch.chdir(REPO)
  result = run([sys.executable, "launch/sweep.py", "configs/quickstart.py", "--dry-run",
                "--only", "retrieval.k=5", "--tpu", "rr", "--zone", "z", "--project", "p",
                "--stages", "prepare,describe"])
  assert result.returncode == 0, result.stderr
  (argv,) = commands(result.stdout)
  cut = argv.index("--")
  assert argv[:cut] == ["bash", "launch/tpu_vm.sh", "--name", "rr", "--zone", "z", "--project",
                        "p", "--log", "retrieval.k=5"]
  assert argv[cut + 1:] == ["python", "-m", "rallrec_jax.main", "--config",
                            "configs/quickstart.py", "--workdir",
                            "workdirs/sweeps/quickstart/retrieval.k=5", "--config.retrieval.k=5",
                            "--stages", "prepare,describe"]
