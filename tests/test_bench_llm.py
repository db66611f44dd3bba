"""`bench llm` in both precisions, on a tiny model: one record per measurement and dtype."""
import json

import pytest

from rallrec_jax.benchmarks import cli, lora as bench_lora, score as bench_score
from tests.llm_fixtures import tiny_hf_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_llama")
  tiny_hf_model(path, "llama")
  return path


@pytest.mark.slow  # about 22 s for both precisions; `-m slow` runs them
@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_both_sides_run_in_the_same_precision(folder, dtype, tolerance):
  step = bench_lora.bench_lora_step(folder, seq=16, batch=2, steps=1, dtype=dtype)
  scoring = bench_score.bench_scoring(folder, seq=16, batch=2, batches=1, dtype=dtype)
  for record in (step, scoring):
    assert record["dtype"] == dtype and dtype in record["competitor"]
    assert record["value"] > 0 and record["competitor_value"] > 0 and record["ratio"] > 0
  # The same weights in the same precision: P(yes) agrees to that precision's rounding.
  assert scoring["max_abs_diff"] < tolerance


@pytest.mark.slow  # two child processes, about 40 s
def test_cli_measures_each_precision_in_its_own_process(folder, capsys):
  cli.main(["llm", "--model-dir", str(folder), "--dtype", "float32,bfloat16", "--seq", "16",
            "--batch", "2", "--steps", "1", "--batches", "1"])
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["bench"], r["dtype"]) for r in records] == [
      ("lora_train_step", "float32"), ("scoring", "float32"),
      ("lora_train_step", "bfloat16"), ("scoring", "bfloat16")]
