"""BookCrossing: one sample per user, ratings 0..10 (0 = implicit, a negative).

  python -m rallrec_jax.main --config configs/bookcrossing.py:path=/data/BX-CSV-Dump \
      --workdir workdirs/bookcrossing

`path` is the folder or zip of BX-Book-Ratings.csv, BX-Books.csv and BX-Users.csv. Users with
at least 5 ratings; each user's ratings are shuffled (seed 42), the last is the target and the
rest its history; label rating >= 5. Ratings of books missing from BX-Books.csv are dropped.
Split: the paper's random 9:1 gives 7,850 train / 873 test; we keep the same 873 test users and
cut the paper's train part into train and valid (8:1:1), so model selection never sees test.
Use --config.data.split="(0.9,0.0,0.1)" for the paper's two-way split.
"""
from rallrec_jax import config as config_lib
from rallrec_jax import sweep as sweep_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, {"path": ""})
  c = config_lib.base_config()
  c.data.name = "bookcrossing"
  c.data.path = arg.path
  c.data.min_history = 4          # users with >= 5 ratings: the target plus >= 4 history items
  c.data.label_threshold = 4.0    # rating >= 5 on the 0..10 scale
  c.data.split = (0.8, 0.1, 0.1)
  c.data.seed = 42
  c.data.unknown_ids = "drop"
  c.retrieval.rerank_short = False  # the paper reranks only histories longer than K here
  return c


def sweep():
  """The paper's ablations around the default (mix3, rerank, K=30, the whole ~7k train split
  as pool); the paper's BookCrossing pool of 256 is one point of the pool-size axis."""
  return sweep_lib.paper_ablations(get_config())
