#!/usr/bin/env bash
# Idempotent per-host setup: a virtual environment in .venv on first use, then the pinned
# requirements, with the JAX build for this host's accelerator.
#
#   bash launch/setup_host.sh [cpu|tpu|cuda12]
#
# Safe to run on every host of a multi-host job before each launch: a second run only checks
# that the pinned packages are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
accelerator="${1:-cpu}"
case "$accelerator" in
  cpu) extra=() ;;
  tpu) extra=("jax[tpu]==$(sed -n 's/^jax==//p' requirements.txt)") ;;
  cuda12) extra=("jax[cuda12]==$(sed -n 's/^jax==//p' requirements.txt)") ;;
  *) echo "usage: $0 [cpu|tpu|cuda12] (got '$accelerator')" >&2; exit 2 ;;
esac
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt "${extra[@]}"
.venv/bin/python -c "import jax; print('jax', jax.__version__, 'devices:', jax.devices())"
