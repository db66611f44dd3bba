"""Amazon Movies & TV (2018 review dump).

  python -m rallrec_jax.main --config configs/amazon_movies.py:path=/data/amazon \
      --workdir workdirs/amazon_movies

`path` is the folder with Movies_and_TV.json(.gz) (reviews) and meta_Movies_and_TV.json(.gz).
Iterative core filter (users with 11-200 ratings, items with 10-200), the 5,000 most rated
items, then chronological samples with at least 5 earlier ratings; label rating > 3; split 8:1:1
(the paper: 113,463 / 14,182 / 14,184). Ratings of items without a metadata title are dropped.
"""
from rallrec_jax import config as config_lib
from rallrec_jax import sweep as sweep_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, {"path": ""})
  c = config_lib.base_config()
  c.data.name = "amazon_movies"
  c.data.path = arg.path
  c.data.min_history = 5
  c.data.label_threshold = 3.0
  c.data.split = (0.8, 0.1, 0.1)
  c.data.unknown_ids = "drop"
  c.data.amazon.category = "Movies_and_TV"
  c.retrieval.rerank_short = False  # the paper reranks only histories longer than K here
  return c


def sweep():
  """The paper's ablations around the default (mix3, rerank, K=30, pool 8192): 20 runs."""
  return sweep_lib.paper_ablations(get_config())
