"""Two local processes on JAX's multi-controller runtime (coordinator on 127.0.0.1, gloo CPU
collectives) fine-tune and evaluate like one process with the same devices and global batch."""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import SingleDeviceSharding

from rallrec_jax import config as config_lib
from rallrec_jax import pipeline
from tests.test_config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CF block alone: no text stages to wait for (retrieval quality is not under test here).
BEFORE = ["prepare", "cf", "mix", "retrieve"]
OVERRIDES = {"mix.variant": "cf"}
DEVICES = 4
TIMEOUT_S = 600

# Runs the CLI with an audit hook that lists every file the process creates, changes or
# removes (Python-level: open for writing, rename, remove, mkdir).
AUDITED_MAIN = textwrap.dedent("""
    import atexit, json, os, runpy, sys
    log_path, written = sys.argv.pop(1), set()
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
      if event == "open" and isinstance(args[0], (str, os.PathLike)):
        mode, flags = args[1], args[2]
        if (mode and set(mode) & set("wax+")) or (not mode and flags & WRITE):
          written.add(os.path.abspath(args[0]))
      elif event in ("os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir",
                     "shutil.rmtree"):
        written.add(os.path.abspath(args[0]))

    atexit.register(lambda: open(log_path, "w").write(json.dumps(sorted(map(str, written)))))
    sys.addaudithook(hook)
    sys.argv[0] = "rallrec_jax.main"
    runpy.run_module("rallrec_jax.main", run_name="__main__")
""")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("base")
  cfg = config_lib.apply_overrides(load_config("quickstart", "runlocal=true"), OVERRIDES)
  pipeline.run(cfg, workdir, stages=BEFORE)
  return workdir


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices, **extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("RALLREC_DISTRIBUTED", None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _cli(workdir):
  return ["--config", f"{REPO}/configs/quickstart.py:runlocal=true", "--workdir", str(workdir),
          "--stages", "finetune,evaluate", *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]


def _wait_all(procs):
  """Wait for every process (killing all of them on a timeout); their outputs."""
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT_S))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, f"exit {p.returncode}\n{out}\n{err[-4000:]}"
  return outs


def _adapters(workdir):
  """(finetune.json, adapters of its final step) restored onto this process's first device."""
  meta = json.loads((workdir / "finetune.json").read_text())
  path = workdir / "checkpoints" / str(meta["step"]) / "state"
  checkpointer = ocp.StandardCheckpointer()
  device = SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata)
  return meta, checkpointer.restore(path, target)["weights"]


def _leaves(tree):
  if isinstance(tree, dict):
    return [x for k in sorted(tree) for x in _leaves(tree[k])]
  return [np.asarray(tree)]


@pytest.mark.slow
def test_two_processes_match_one_and_only_process_zero_writes(base, tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  shutil.copytree(base, single)
  shutil.copytree(base, multi)
  audited = tmp_path / "audited_main.py"
  audited.write_text(AUDITED_MAIN)
  logs = [tmp_path / f"written_{i}.json" for i in range(2)]

  one = subprocess.Popen([sys.executable, "-m", "rallrec_jax.main", *_cli(single)], cwd=REPO,
                         env=_env(DEVICES), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
  _wait_all([one])
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(audited), str(logs[i]), *_cli(multi)], cwd=REPO,
      env=_env(DEVICES // 2, RALLREC_DISTRIBUTED=1, RALLREC_COORDINATOR=f"127.0.0.1:{port}",
               RALLREC_NUM_PROCESSES=2, RALLREC_PROCESS_ID=i),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = _wait_all(procs)
  assert "finetune=ran evaluate=ran" in outs[0][0] and "=ran" not in outs[1][0]

  meta_one, adapters_one = _adapters(single)
  meta_two, adapters_two = _adapters(multi)
  assert meta_one["step"] == meta_two["step"] and meta_one["examples"] == meta_two["examples"]
  for a, b in zip(_leaves(adapters_one), _leaves(adapters_two), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  lines = [(single / "metrics.jsonl").read_text().splitlines(),
           (multi / "metrics.jsonl").read_text().splitlines()]
  assert len(lines[0]) == len(lines[1]) > 0
  for a, b in zip(*lines):
    a, b = json.loads(a), json.loads(b)
    assert a["step"] == b["step"] and a["examples_seen"] == b["examples_seen"]
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
  for split in ("valid", "test"):
    want = json.loads((single / "eval" / "best" / f"{split}.json").read_text())
    got = json.loads((multi / "eval" / "best" / f"{split}.json").read_text())
    assert want["n"] == got["n"] and want["step"] == got["step"]
    np.testing.assert_allclose(got["auc"], want["auc"], atol=1e-4)
    np.testing.assert_allclose(got["logloss"], want["logloss"], rtol=1e-4)
    scores = [np.load(w / "eval" / "best" / f"{split}_predictions.npz")["score"]
              for w in (single, multi)]
    np.testing.assert_allclose(scores[1], scores[0], atol=1e-4)

  written = [json.loads(path.read_text()) for path in logs]
  inside = [[p for p in w if p.startswith(str(multi))] for w in written]
  assert any(p.endswith("metrics.jsonl") for p in inside[0])
  assert any("/eval/" in p for p in inside[0]) and any("/manifests/" in p for p in inside[0])
  outside_checkpoints = [p for p in inside[1] if not p.startswith(str(multi / "checkpoints"))]
  assert outside_checkpoints == [], outside_checkpoints
