"""Benchmarks and the competitor code they measure against (PyTorch transformers, PEFT).

The top floor: these modules import the library; nothing in the library imports them.
`python -m rallrec_jax.bench NAME` runs one (see `cli.py`).
"""
