"""`bench compile` on a 2-layer cut of the 8B shape: one record per program, both layouts."""
import pytest

from rallrec_jax.benchmarks import compile as bench_compile


@pytest.mark.slow  # compiles a 2-layer cut of the 8B shape in both layouts, about 30 s
def test_one_record_per_program_scanned_against_unrolled():
  rows = bench_compile.bench_compile(layers=2, seq=8, batch=1, score_batch=1)
  assert [row["row"] for row in rows] == ["lora_train_step", "score"]
  for row in rows:
    assert row["bench"] == "compile" and row["layers"] == 2 and row["unit"] == "s"
    assert row["value"] > 0 and row["competitor_value"] > 0 and row["ratio"] > 0
