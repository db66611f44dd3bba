"""`python -m rallrec_jax.bench NAME`: the benchmarks' command line (rallrec_jax/benchmarks/cli.py)."""
from rallrec_jax.benchmarks.cli import main

if __name__ == "__main__":
  main()
