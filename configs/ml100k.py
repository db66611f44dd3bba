"""MovieLens 100K: the small real dataset for laptops, tests and benchmarks.

  python -m rallrec_jax.main --config configs/ml100k.py:path=../shared/data/ml-100k \
      --workdir workdirs/ml100k

Samples: 95,285 = 76,228 train / 9,528 valid / 9,529 test (chronological 8:1:1).
Sized for a 2-core CPU: `prepare` takes about a second.
"""
from rallrec_jax import config as config_lib
from rallrec_jax import sweep as sweep_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, {"path": "", "source": "files"})
  c = config_lib.base_config()
  c.data.name = "ml100k"
  c.data.source = arg.source
  c.data.path = arg.path
  c.data.min_history = 5
  c.data.label_threshold = 3.0
  c.data.split = (0.8, 0.1, 0.1)
  return c


def sweep():
  """The paper's ablations around the default (mix3, rerank, K=30, pool 8192): 20 runs."""
  return sweep_lib.paper_ablations(get_config())
