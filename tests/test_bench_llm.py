"""`bench llm` in both precisions, on a tiny model: one record per measurement and dtype."""
import pytest

from rallrec_jax.benchmarks import lora as bench_lora, score as bench_score
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
