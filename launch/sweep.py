"""Run every setting of a config's sweep() that has not finished its evaluation yet.

  python launch/sweep.py CONFIG[:ARG] [--root DIR] [--only SUBSTRING] [--stages a,b]
      [--keep-going] [--dry-run] [--tpu NAME --zone Z --project P] [-- extra main flags]

Each setting runs `python -m rallrec_jax.main --config CONFIG[:ARG] --workdir ROOT/NAME
--config.key=value ...` (NAME is made of its overrides, `default` for the config as is), one
after another, stopping at the first failure (its exit code) unless --keep-going. A setting
whose ROOT/NAME already holds the evaluate manifest and eval/{checkpoint}/{split}.json of
every split is skipped (unless the extra flags hold --force). Local runs use this interpreter
and check the whole config (data paths included) before the first run starts. --dry-run
prints one command per line (done ones as `# skip (done): ...`) and checks only the override
keys. --tpu hands each run to launch/tpu_vm.sh on an existing TPU VM, where `python` is its
checkout's .venv.
"""
import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rallrec_jax import sweep as sweep_lib  # noqa: E402  pylint: disable=wrong-import-position


def parse_args(argv):
  if "--" in argv:
    cut = argv.index("--")
    argv, extra = argv[:cut], argv[cut + 1:]
  else:
    extra = []
  _, usage, description = __doc__.split("\n\n", 2)
  parser = argparse.ArgumentParser(
      usage=usage.strip(), description=description,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config", help="config file and optional arg, e.g. "
                      "configs/ml1m.py:path=/data/ml-1m")
  parser.add_argument("--root", help="folder of the runs' workdirs "
                      "(default: workdirs/sweeps/<config name>)")
  parser.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                      help="run only settings whose name contains SUBSTRING (repeatable)")
  parser.add_argument("--stages", help="passed to main: comma-separated stages to run")
  parser.add_argument("--keep-going", action="store_true",
                      help="run the remaining settings after a failure")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("--tpu", metavar="NAME", help="run each setting on this TPU VM")
  parser.add_argument("--zone", help="TPU VM zone (with --tpu)")
  parser.add_argument("--project", help="TPU VM project (with --tpu)")
  args = parser.parse_args(argv)
  if args.tpu and not (args.zone and args.project):
    parser.error("--tpu needs --zone and --project")
  if (args.zone or args.project) and not args.tpu:
    parser.error("--zone and --project go with --tpu")
  args.extra = extra
  return args


def check_extra(cfg, extra):
  """Fail early on an extra --config.KEY=VALUE flag whose key the config lacks."""
  for flag in extra:
    if flag.startswith("--config."):
      try:
        sweep_lib.get_value(cfg, flag[len("--config."):].split("=", 1)[0])
      except sweep_lib.SweepError as e:
        raise sweep_lib.SweepError(f"extra flag {flag}: {e}") from None


def main(argv):
  args = parse_args(argv)
  path, _ = sweep_lib.split_spec(args.config)
  root = args.root or str(Path("workdirs") / "sweeps" / Path(path).stem)
  local = not (args.dry_run or args.tpu)
  try:
    runs = sweep_lib.expand(args.config, root, check_paths=local)
    for run in runs:
      check_extra(run.cfg, args.extra)
  except sweep_lib.SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.only:
    runs = [r for r in runs if any(s in r.name for s in args.only)]
    if not runs:
      print(f"error: no setting of {path} matches --only {' '.join(args.only)}", file=sys.stderr)
      return 2
  extra = (["--stages", args.stages] if args.stages else []) + args.extra
  force = "--force" in extra

  failed = []
  for i, run in enumerate(runs, 1):
    cmd = sweep_lib.command(args.config, run, extra=extra)
    if args.tpu:
      script = os.path.relpath(REPO / "launch" / "tpu_vm.sh")
      cmd = ["bash", script, "--name", args.tpu, "--zone", args.zone, "--project", args.project,
             "--log", run.name, "--"] + cmd
    is_done = not force and sweep_lib.done(run.workdir, run.cfg)
    if args.dry_run:
      print(("# skip (done): " if is_done else "") + shlex.join(cmd))
      continue
    if is_done:
      print(f"[{i}/{len(runs)}] skip (done): {run.name} ({run.workdir})", flush=True)
      continue
    if not args.tpu:
      cmd = [sys.executable] + cmd[1:]
    print(f"[{i}/{len(runs)}] {run.name}: {shlex.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    code = subprocess.run(cmd, env=env, check=False).returncode
    if code:
      print(f"[{i}/{len(runs)}] {run.name} failed with exit code {code}", file=sys.stderr,
            flush=True)
      if not args.keep_going:
        return code
      failed.append((run.name, code))
  if failed:
    print(f"{len(failed)} of {len(runs)} settings failed: "
          + ", ".join(f"{name} (exit {code})" for name, code in failed), file=sys.stderr)
    return failed[0][1]
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main(sys.argv[1:]))
  except KeyboardInterrupt:
    sys.exit(130)
