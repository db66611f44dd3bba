"""MovieLens 1M, the paper's main dataset.

  python -m rallrec_jax.main --config configs/ml1m.py:path=/data/ml-1m.zip --workdir workdirs/ml1m

`path` is the GroupLens folder or its original zip (ratings.dat, movies.dat, users.dat).
Samples: 970,009 = 776,007 train / 97,000 valid / 97,002 test (chronological 8:1:1; a rating is a
sample when its user has at least 5 earlier ratings; label rating > 3). `prepare` takes a few
seconds on 2 CPU cores. The paper reports test AUC 0.77 with Llama-3.1-8B and K=30.
"""
from rallrec_jax import config as config_lib
from rallrec_jax import sweep as sweep_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, {"path": "", "source": "files"})
  c = config_lib.base_config()
  c.data.name = "ml1m"
  c.data.source = arg.source
  c.data.path = arg.path
  c.data.min_history = 5
  c.data.label_threshold = 3.0
  c.data.split = (0.8, 0.1, 0.1)
  return c


def sweep():
  """The paper's ablations around the default (mix3, rerank, K=30, pool 8192): 20 runs."""
  return sweep_lib.paper_ablations(get_config())
