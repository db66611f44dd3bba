"""Run RALLRec stages on a workdir.

  rallrec --config configs/ml100k.py:path=DATA --workdir W [--stages a,b]
  (the same as python -m rallrec_jax.main ...; `pip install -e .` installs the command)

Any config leaf can be overridden, e.g. --config.retrieval.k=20. Multi-host jobs set
RALLREC_DISTRIBUTED=1 on every host (see rallrec_jax/distributed.py and launch/). Stages run
in this order; each one whose inputs and config are unchanged since its last run is skipped:

{stages}
"""
import logging
import os
import signal
import sys
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rallrec_jax import distributed, pipeline, stage
from rallrec_jax.eval import table
from rallrec_jax.config import ConfigError
from rallrec_jax.data import DataError

__doc__ = __doc__.format(stages=pipeline.describe_stages())

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with an arg: configs/ml1m.py:path=DIR.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for every artifact of the run.")
_STAGES = flags.DEFINE_list(
    "stages", None, "Comma-separated stages to run (default: all). Stages: "
    + ", ".join(pipeline.STAGES) + ".")
_FORCE = flags.DEFINE_bool("force", False, "Rerun the selected stages even when up to date.")


def _fail(message):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl flag parsing, with config mistakes reported as one line naming the key."""
  if any(a in ("-h", "--help", "--helpshort") for a in argv[1:]):
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
  for i, arg in enumerate(argv[1:], 1):
    value = (arg.split("=", 1)[1] if arg.startswith("--config=")
             else argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if value is not None and not Path(value.split(":", 1)[0]).is_file():
      _fail(f"--config {value}: no such config file {value.split(':', 1)[0]!r} (from {Path.cwd()})")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    cause = e
    while cause is not None and not isinstance(cause, ConfigError):
      cause = cause.__cause__ or cause.__context__
    if cause is None:
      _fail(f"{e}\nPass --help for usage.")
    # config_flags re-raises errors of get_config with the traceback in the message.
    _fail(str(cause).strip().splitlines()[-1].split("ConfigError: ", 1)[-1])
  except (AttributeError, KeyError) as e:
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    _fail(f"config key {', '.join(bad) or '?'}: unknown key ({e}); the keys are those of "
          f"rallrec_jax/config.py:base_config")


def _preempt(*_):
  """SIGTERM outside a training loop (which saves a checkpoint first): stop where the run is."""
  raise stage.Preempted("stopped by SIGTERM; rerun the same command to continue")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.get_absl_handler().setFormatter(
      logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
  # Library chatter (orbax, jax) at warnings only; the pipeline's own progress at info.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("rallrec_jax").setLevel(logging.INFO)
  # transformers warns on import that PyTorch is missing; this JAX pipeline never needs it.
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  signal.signal(signal.SIGTERM, _preempt)
  try:
    distributed.initialize()
    status = pipeline.run(_CONFIG.value, _WORKDIR.value, stages=_STAGES.value, force=_FORCE.value)
  except (ConfigError, DataError, pipeline.PipelineError) as e:
    _fail(e)
  except stage.Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(128 + signal.SIGTERM)
  signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the stages are over: nothing left to name
  if not distributed.is_primary():
    return
  print(" ".join(f"{name}={state}" for name, state in status.items()))
  checkpoint = _CONFIG.value.eval.checkpoint
  text = table.results_table(_WORKDIR.value, checkpoint)
  if text:
    print(text)
  print(table.closing_line(_WORKDIR.value, checkpoint))


def run():
  """The `rallrec` command: `python -m rallrec_jax.main` under a short name."""
  # absl's --help shows the __main__ module's docstring and the key flags of sys.argv[0].
  sys.modules["__main__"].__doc__ = __doc__
  for flag in (_CONFIG, _WORKDIR, _STAGES, _FORCE):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[flag.name])
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
