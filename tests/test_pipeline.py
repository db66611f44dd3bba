"""The stage graph: manifests, skipping up-to-date stages, rerunning changed ones, the CLI."""
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rallrec_jax import config as config_lib
from rallrec_jax import data, pipeline
from rallrec_jax.eval import metrics, results
from rallrec_jax.eval import table as table_lib
from rallrec_jax.eval.evaluate import write_eval
from rallrec_jax.stage import Stage
from tests.conftest import REPO
from tests.test_movielens import random_ratings, write_ml1m


def ml1m_config(folder):
  cfg = config_lib.base_config()
  cfg.data.name, cfg.data.path = "ml1m", str(folder)
  return cfg


def register_after_prepare(monkeypatch, **fields):
  """Add a stage reading `prepare`'s artifacts to a copy of the registry, for this test only."""
  monkeypatch.setattr(pipeline, "STAGES", dict(pipeline.STAGES))
  pipeline.register(Stage(help=f"writes {', '.join(fields['outputs'])}",
                                   deps=("prepare",), **fields))


@pytest.fixture
def folder(tmp_path):
  return write_ml1m(tmp_path / "ml-1m", random_ratings())


def test_manifest_skip_and_rerun(tmp_path, folder):
  workdir = tmp_path / "w"
  cfg = ml1m_config(folder)
  assert pipeline.run(cfg, workdir, stages=["prepare"]) == {"prepare": "ran"}
  manifest = pipeline.read_manifest(workdir, "prepare")
  assert manifest["config"]["data"]["path"] == str(folder)
  assert set(manifest["inputs"]) == {str(folder / n) for n in ("ratings.dat", "movies.dat",
                                                               "users.dat")}
  assert manifest["outputs"]["data"] == pipeline.fingerprint(workdir / "data")
  assert json.loads((workdir / "config.json").read_text())["data"]["name"] == "ml1m"

  assert pipeline.run(cfg, workdir, stages=["prepare"]) == {"prepare": "skipped"}
  assert pipeline.run(cfg, workdir, stages=["prepare"], force=True) == {"prepare": "ran"}

  cfg.data.min_history = 4
  assert pipeline.run(cfg, workdir, stages=["prepare"]) == {"prepare": "ran"}
  assert pipeline.run(cfg, workdir, stages=["prepare"]) == {"prepare": "skipped"}

  with open(folder / "ratings.dat", "ab") as f:
    f.write(b"1::1::5::978400000\n")
  assert pipeline.run(cfg, workdir, stages=["prepare"]) == {"prepare": "ran"}

  (workdir / "data" / "meta.json").unlink()
  assert pipeline.run(cfg, workdir, stages=["prepare"]) == {"prepare": "ran"}
  assert (workdir / "data" / "meta.json").is_file()


def test_downstream_stage_needs_a_current_upstream(tmp_path, folder, monkeypatch):
  calls = []

  def count_items(cfg, workdir):
    calls.append(cfg.retrieval.k)
    n = json.loads((workdir / "data" / "meta.json").read_text())["num_items"]
    (workdir / "count.txt").write_text(str(n))

  register_after_prepare(monkeypatch, name="count", run=count_items,
                         config_keys=("retrieval",), outputs=("count.txt",))
  workdir = tmp_path / "w"
  cfg = ml1m_config(folder)
  with pytest.raises(pipeline.PipelineError,
                     match="'prepare' has not run\\): add prepare to --stages"):
    pipeline.run(cfg, workdir, stages=["count"])
  both = ["prepare", "count"]
  assert pipeline.run(cfg, workdir, stages=both) == {"prepare": "ran", "count": "ran"}
  assert pipeline.run(cfg, workdir, stages=["count"]) == {"count": "skipped"}
  cfg.retrieval.k = 7
  assert pipeline.run(cfg, workdir, stages=["count"]) == {"count": "ran"}
  assert calls == [30, 7]
  cfg.data.min_history = 3
  with pytest.raises(pipeline.PipelineError, match=r"'prepare' is out of date for this config\)"):
    pipeline.run(cfg, workdir, stages=["count"])
  assert pipeline.run(cfg, workdir, stages=both) == {"prepare": "ran", "count": "ran"}


def test_every_missing_upstream_stage_is_named_at_once(tmp_path, folder):
  cfg = ml1m_config(folder)
  cfg.embed.source = "template"
  with pytest.raises(pipeline.PipelineError,
                     match="add prepare,embed,cf,align,mix to --stages$"):
    pipeline.run(cfg, tmp_path / "w", stages=["retrieve"])
  cfg.embed.source = "description"
  with pytest.raises(pipeline.PipelineError, match="add prepare,describe,embed,cf,align "):
    pipeline.run(cfg, tmp_path / "w", stages=["retrieve", "mix"])
  assert not (tmp_path / "w").exists()


def test_force_starts_a_resumable_stage_afresh(tmp_path, folder, monkeypatch, caplog):
  found = []

  def resumable(cfg, workdir):
    found.append(sorted(p.name for p in (workdir / "partial").glob("*")))
    (workdir / "partial").mkdir(exist_ok=True)
    (workdir / "partial" / f"step{len(found)}").write_text("state")
    (workdir / "done.txt").write_text("done")

  register_after_prepare(monkeypatch, name="train", run=resumable, outputs=("done.txt",),
                         resumes=("partial",))
  workdir = tmp_path / "w"
  cfg = ml1m_config(folder)
  pipeline.run(cfg, workdir, stages=["prepare", "train"])
  (workdir / "partial" / "step1").rename(workdir / "partial" / "kept")
  assert pipeline.run(cfg, workdir, stages=["train"]) == {"train": "skipped"}
  (workdir / "manifests" / "train.json").unlink()
  pipeline.run(cfg, workdir, stages=["train"])
  with caplog.at_level("INFO", logger=pipeline.log.name):
    pipeline.run(cfg, workdir, stages=["train"], force=True)
  assert found == [[], ["kept"], []]
  assert "train: --force: starting afresh, removed partial" in caplog.text


def test_execution_keys_neither_rerun_nor_restart(tmp_path, folder, monkeypatch):
  """Mesh, remat, attention kernel, layers' layout and inference batch sizes leave results
  alone: changing them skips finished stages (old manifests that hold them too) and keeps
  resume keys. Manifests written before a config key existed stay current while the key has
  its default."""
  monkeypatch.setattr(pipeline, "STAGES", dict(pipeline.STAGES))
  pipeline.register(Stage(
      name="count", help="writes count.txt", run=lambda cfg, w: (w / "count.txt").write_text("1"),
      config_keys=("retrieval", "model", "eval"), deps=("prepare",), outputs=("count.txt",)))
  workdir = tmp_path / "w"
  cfg = ml1m_config(folder)
  assert pipeline.run(cfg, workdir, stages=["prepare", "count"])["count"] == "ran"
  key = config_lib.result_config(cfg, "model")
  assert {"mesh", "remat", "attention", "scan_layers"}.isdisjoint(key) and "path" in key
  cfg.model.mesh, cfg.model.remat, cfg.model.attention = (("fsdp", -1),), "full", "xla"
  cfg.model.scan_layers = "true"
  cfg.retrieval.batch_size, cfg.eval.batch_size = 7, 3
  assert pipeline.run(cfg, workdir, stages=["count"]) == {"count": "skipped"}
  assert config_lib.result_config(cfg, "model") == key

  path = workdir / "manifests" / "count.json"
  manifest = json.loads(path.read_text())
  manifest["config"]["model"]["remat"] = "dots"     # as written before remat was left out
  path.write_text(json.dumps(manifest))
  assert pipeline.run(cfg, workdir, stages=["count"]) == {"count": "skipped"}
  del manifest["config"]["model"]["dtype"]          # keys added to the config since read as
  del manifest["config"]["eval"]                    # their defaults
  path.write_text(json.dumps(manifest))
  assert pipeline.run(cfg, workdir, stages=["count"]) == {"count": "skipped"}
  cfg.retrieval.k, cfg.model.dtype = 7, "bfloat16"
  assert pipeline.run(cfg, workdir, stages=["count"]) == {"count": "ran"}


def test_a_manifest_from_before_a_key_reads_as_what_the_code_did_then(tmp_path, folder,
                                                                      monkeypatch):
  """finetune.loss joined the config with default 'answer'; older fine-tunes used 'lm'."""
  assert config_lib.VALUES_BEFORE_KEY["finetune.loss"] == "lm"
  monkeypatch.setattr(pipeline, "STAGES", dict(pipeline.STAGES))
  pipeline.register(Stage(
      name="tune", help="writes tune.txt", run=lambda cfg, w: (w / "tune.txt").write_text("1"),
      config_keys=("finetune",), deps=("prepare",), outputs=("tune.txt",)))
  workdir = tmp_path / "w"
  cfg = ml1m_config(folder)
  cfg.finetune.loss = "lm"
  assert pipeline.run(cfg, workdir, stages=["prepare", "tune"])["tune"] == "ran"
  path = workdir / "manifests" / "tune.json"
  manifest = json.loads(path.read_text())
  del manifest["config"]["finetune"]["loss"]
  path.write_text(json.dumps(manifest))
  assert pipeline.run(cfg, workdir, stages=["tune"]) == {"tune": "skipped"}
  cfg.finetune.loss = "answer"
  assert pipeline.run(cfg, workdir, stages=["tune"]) == {"tune": "ran"}


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "rallrec_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_a_full_run_leaves_out_descriptions_nothing_reads_and_the_export():
  cfg = config_lib.base_config()
  names = lambda: [s.name for s in pipeline.select(None, cfg)]
  assert names() == [n for n in pipeline.STAGES if n != "export"]
  cfg.embed.source = "template"
  assert names() == [n for n in pipeline.STAGES if n not in ("describe", "export")]
  assert [s.name for s in pipeline.select(["describe"], cfg)] == ["describe"]
  assert [s.name for s in pipeline.select(["export"], cfg)] == ["export"]


def test_help_lists_the_stages_and_what_they_write():
  out = _cli("--help")
  assert out.returncode == 0
  for name, stage in pipeline.STAGES.items():
    assert name in out.stdout
  assert "writes data/" in " ".join(out.stdout.split())


@pytest.mark.slow  # six CLI processes, about 40 s; tests/test_config.py checks the messages in-process
def test_cli_runs_and_reports_config_mistakes(tmp_path, folder):
  ok = _cli("--config", f"configs/ml1m.py:path={folder}", "--workdir", str(tmp_path / "w"),
            "--stages", "prepare")
  assert ok.returncode == 0 and ok.stdout.splitlines()[0] == "prepare=ran", ok.stderr
  cases = [
      (["--config", f"configs/ml1m.py:path={folder}", "--config.data.nmae=x"],
       "config key --config.data.nmae: unknown key"),
      (["--config", "configs/ml1m.py:pth=/x"], "config key arg 'pth': unknown"),
      (["--config", f"configs/ml1m.py:path={folder}", "--config.retrieval.k=-3"],
       "config key retrieval.k: must be a positive integer"),
      (["--config", "configs/ml1m.py"], "config key data.path"),
      (["--config", f"configs/ml1m.py:path={folder}", "--stages", "prepare,trian"],
       "unknown stage(s) ['trian']"),
  ]
  for args, message in cases:
    out = _cli(*args, "--workdir", str(tmp_path / "w2"),
               *([] if "--stages" in args else ["--stages", "prepare"]))
    assert out.returncode == 2, (args, out.stderr)
    assert message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_a_failed_rerun_keeps_the_config_of_the_run_that_made_the_artifacts(tmp_path, folder,
                                                                              monkeypatch):
  workdir = tmp_path / "w"
  cfg = ml1m_config(folder)
  pipeline.run(cfg, workdir, stages=["prepare"])
  before = (workdir / "config.json").read_bytes()
  assert pipeline.read_manifest(workdir, "prepare")["config"]["data"]["min_history"] == 5
  cfg.data.min_history = 4
  ratings = (folder / "ratings.dat").read_bytes()
  (folder / "ratings.dat").write_bytes(ratings + b"1::2::four::978300000\n")
  with pytest.raises(data.DataError, match="rating is not an integer"):
    pipeline.run(cfg, workdir, stages=["prepare"])
  assert (workdir / "config.json").read_bytes() == before
  (folder / "ratings.dat").write_bytes(ratings)

  def fails(cfg, workdir):
    raise RuntimeError("stage failed")

  monkeypatch.setattr(pipeline, "STAGES", dict(pipeline.STAGES))
  pipeline.register(Stage(name="boom", help="fails", run=fails, config_keys=("eval",),
                                   deps=("prepare",), outputs=("boom.txt",)))
  cfg = ml1m_config(folder)
  cfg.eval.max_samples = 3
  with pytest.raises(RuntimeError, match="stage failed"):
    pipeline.run(cfg, workdir, stages=["boom"])
  assert (workdir / "config.json").read_bytes() == before
  assert pipeline.read_manifest(workdir, "boom") is None


def test_config_json_is_written_once_a_stage_has_run(tmp_path, folder):
  workdir = tmp_path / "w"
  cfg = ml1m_config(folder)
  pipeline.run(cfg, workdir, stages=["prepare"])
  cfg.data.min_history = 4
  assert pipeline.run(cfg, workdir, stages=["prepare"]) == {"prepare": "ran"}
  written = json.loads((workdir / "config.json").read_text())
  assert written["data"]["min_history"] == 4
  assert pipeline.read_manifest(workdir, "prepare")["config"]["data"] == written["data"]


def _fake_eval(workdir, checkpoint, split="test", step=None):
  """A small evaluation of `checkpoint` on `split`, as the evaluate stage writes it."""
  labels = np.array([0, 1, 0, 1], np.int8)
  scores = np.array([0.2, 0.7, 0.4, 0.6], np.float32)
  summary = {**metrics.all_metrics(labels, scores), "checkpoint": checkpoint, "step": step}
  write_eval(results.results_dir(workdir, checkpoint), split, summary, np.arange(4), labels,
             scores)


def test_a_run_ends_saying_where_its_results_are_and_how_to_report_them(tmp_path):
  workdir = tmp_path / "w"
  args = ("--config", "configs/quickstart.py:runlocal=true", "--workdir", str(workdir),
          "--stages", "prepare")
  out = _cli(*args)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      "prepare=ran", f"results: no evaluation of eval.checkpoint=best in {workdir} yet "
      "(run --stages evaluate)"]
  _fake_eval(workdir, "best", step=7)
  _fake_eval(workdir, "none")
  out = _cli(*args, "--config.eval.checkpoint=none")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == "prepare=skipped" and lines[-2].endswith("none (zero-shot)")
  assert lines[-1] == (f"results: {workdir}/eval/none/ ; report: rallrec-report {workdir} "
                       "--checkpoint none")
  assert table_lib.closing_line(workdir) == (
      f"results: {workdir}/eval/best/ ; report: rallrec-report {workdir}")
  assert table_lib.closing_line(workdir, "latest").startswith(
      "results: no evaluation of eval.checkpoint=latest in ")
  only_valid = tmp_path / "v"
  _fake_eval(only_valid, "16", split="valid", step=16)
  assert table_lib.closing_line(only_valid) == (
      f"results: {only_valid}/eval/step-16/ ; report: rallrec-report {only_valid} --split valid")


def test_sigterm_names_the_stage_it_stopped(tmp_path):
  workdir = tmp_path / "w"
  log = tmp_path / "stderr"
  with log.open("w") as err:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rallrec_jax.main", "--config",
         "configs/quickstart.py:runlocal=true", "--workdir", str(workdir), "--stages",
         "prepare,cf", "--config.cf.epochs=100000"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
  try:
    deadline = time.monotonic() + 120
    while "lightgcn epoch 2: " not in log.read_text():
      assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM, log.read_text()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  text = log.read_text()
  said = [line for line in text.splitlines() if line.startswith("preempted:")]
  assert len(said) == 1 and re.fullmatch(
      r"preempted: cf \(no manifest written\): stopped by SIGTERM at step \d+, checkpoint "
      r"saved in \S+/cf/checkpoints; rerun the same command to resume", said[0]), said
  assert "Traceback" not in text
  assert pipeline.read_manifest(workdir, "prepare") is not None
  assert pipeline.read_manifest(workdir, "cf") is None

