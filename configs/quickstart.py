"""Quickstart: the whole pipeline on a small synthetic dataset, on a CPU, in minutes.

  python -m rallrec_jax.main --config configs/quickstart.py --workdir workdirs/quickstart

The synthetic data has planted taste clusters, item text tied to them and taste drift over
time. `runlocal=true` shrinks it further (as the tests do); `ratings=N` sets the number of ratings.
"""
from rallrec_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, {"runlocal": False, "ratings": 12000})
  c = config_lib.base_config()
  c.data.name = "synthetic"
  c.data.synthetic.num_ratings = arg.ratings
  if arg.runlocal:
    c.data.synthetic.num_users = 60
    c.data.synthetic.num_items = 80
    c.data.synthetic.num_ratings = 2400
  c.retrieval.k = 10
  return c
