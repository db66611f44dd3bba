#!/usr/bin/env bash
# Run a command on every worker of a Cloud TPU VM (one host or a multi-host slice).
#
#   bash launch/tpu_vm.sh --name NAME --zone ZONE --project PROJECT [--create --type TYPE
#       [--version RUNTIME] [--spot]] [--fetch-logs DIR] [--delete] [--log NAME] [--dry-run]
#       [-- python -m rallrec_jax.main --config ... --workdir ...]
#
# See usage() below for the steps. Multi-host runs need a --workdir that every worker sees
# (a gcsfuse or Filestore mount): process 0 writes the artifacts, the others read them.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash launch/tpu_vm.sh --name NAME --zone ZONE --project PROJECT [options] [-- COMMAND...]

Steps, in order (each only when asked for):
  --create           create the TPU VM (needs --type; --version, --spot)
  -- COMMAND...      copy this checkout's tracked files (git ls-files; a warning names the
                     untracked ones, left out: git add what the run needs) to
                     ~/rallrec_jax on every worker, run `bash launch/setup_host.sh tpu` there,
                     then run COMMAND on every worker with RALLREC_DISTRIBUTED=1 in the
                     checkout's .venv; each worker logs to ~/rallrec_jax/logs/LOG-<host>.log
  --fetch-logs DIR   copy every worker's ~/rallrec_jax/logs into DIR/logs (also after a
                     failed run)
  --delete           delete the TPU VM, without asking (also after a failed run)

Options:
  --name NAME        TPU VM name (required)
  --zone ZONE        zone, e.g. us-central2-b (required)
  --project PROJECT  Google Cloud project (required)
  --type TYPE        accelerator type, e.g. v5litepod-8 (required with --create)
  --version RUNTIME  TPU runtime version (default: tpu-ubuntu2204-base)
  --spot             create a Spot VM (cheaper, can be preempted)
  --log NAME         log file name stem (default: run)
  --dry-run          print each gcloud command, one per line, shell-quoted; run nothing
  -h, --help         this text

Example:
  bash launch/tpu_vm.sh --name rr --zone us-central2-b --project my-proj --type v5litepod-8 \
    --create --spot --fetch-logs out --delete -- \
    python -m rallrec_jax.main --config configs/ml1m.py:path=/mnt/data/ml-1m --workdir /mnt/w
EOF
}

# usage_error (after the script's own usage), q and qjoin (shell quoting).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

name="" zone="" project="" type="" version="tpu-ubuntu2204-base" log="run" logs_dir=""
spot=0 create=0 delete=0 dry_run=0
cmd=()
while (($#)); do
  case "$1" in
    --name|--zone|--project|--type|--version|--log|--fetch-logs)
      (($# >= 2)) || usage_error "$1 needs a value"
      case "$1" in
        --name) name=$2 ;;
        --zone) zone=$2 ;;
        --project) project=$2 ;;
        --type) type=$2 ;;
        --version) version=$2 ;;
        --log) log=$2 ;;
        --fetch-logs) logs_dir=$2 ;;
      esac
      shift 2 ;;
    --spot) spot=1; shift ;;
    --create) create=1; shift ;;
    --delete) delete=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; cmd=("$@"); break ;;
    *) usage_error "unknown argument '$1' (the command goes after --)" ;;
  esac
done

missing=()
[ -n "$name" ] || missing+=(--name)
[ -n "$zone" ] || missing+=(--zone)
[ -n "$project" ] || missing+=(--project)
((!create)) || [ -n "$type" ] || missing+=("--type (with --create)")
((${#missing[@]} == 0)) || usage_error "missing ${missing[*]}"
[[ $log =~ ^[A-Za-z0-9._=,+-]+$ ]] || usage_error "--log '$log': use letters, digits and ._=,+-"
((create || delete || ${#cmd[@]} || ${#logs_dir})) ||
  usage_error "nothing to do: give --create, a command after --, --fetch-logs or --delete"
((!spot || create)) || usage_error "--spot goes with --create"

if ((!dry_run)); then
  command -v gcloud >/dev/null ||
    { echo "error: gcloud not found; install the Google Cloud CLI (or use --dry-run)" >&2; exit 1; }
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
remote_dir=rallrec_jax
tarball="${TMPDIR:-/tmp}/rallrec_jax-$name.tar.gz"
where=(--zone "$zone" --project "$project")

gc() {
  if ((dry_run)); then qjoin gcloud "$@"; else gcloud "$@"; fi
}

# This checkout's tracked files (those that still exist) as a tarball; a warning names the
# untracked ones, which stay behind.
pack() {
  local untracked
  if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    untracked=$(git -C "$repo" ls-files --others --exclude-standard --directory | tr '\n' ' ')
    [ -z "$untracked" ] || echo "warning: not copied, as git does not track them (git add" \
      "what the run needs): ${untracked% }" >&2
  elif ((!dry_run)); then
    echo "error: $repo is not a git checkout; cannot list the files to copy" >&2
    return 1
  fi
  if ((dry_run)); then
    echo "# pack: git ls-files in $(q "$repo") -> $(q "$tarball")"
    return
  fi
  trap 'rm -f "$tarball"' EXIT
  (cd "$repo" && git ls-files -z |
    while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done |
    tar -czf "$tarball" --null -T -)
}

run_remote() {
  local run setup
  setup="mkdir -p $remote_dir && tar -xzf $remote_dir.tar.gz -C $remote_dir"
  setup+=" && rm $remote_dir.tar.gz && cd $remote_dir && bash launch/setup_host.sh tpu"
  local logfile="logs/$log-\$(hostname).log"
  run="cd $remote_dir && mkdir -p logs && . .venv/bin/activate && export RALLREC_DISTRIBUTED=1"
  run+=" && { nohup $(qjoin "${cmd[@]}") > $logfile 2>&1; s=\$?;"
  run+=" echo \"\$(hostname): exit \$s, log ~/$remote_dir/$logfile\";"
  run+=" tail -n 5 $logfile; exit \$s; }"
  pack || return
  gc compute tpus tpu-vm scp "$tarball" "$name:$remote_dir.tar.gz" "${where[@]}" --worker=all ||
    return
  gc compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command "$setup" || return
  gc compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command "$run"
}

if ((create)); then
  flags=(--accelerator-type "$type" --version "$version")
  ((!spot)) || flags+=(--spot)
  gc compute tpus tpu-vm create "$name" "${where[@]}" "${flags[@]}"
fi

status=0
if ((${#cmd[@]})); then
  run_remote || status=$?
  ((status == 0)) || echo "error: the run on $name failed (exit $status)" >&2
fi
if [ -n "$logs_dir" ]; then
  ((dry_run)) || mkdir -p "$logs_dir"
  gc compute tpus tpu-vm scp --recurse "$name:$remote_dir/logs" "$logs_dir" "${where[@]}" \
    --worker=all || status=$((status ? status : $?))
fi
if ((delete)); then
  gc compute tpus tpu-vm delete "$name" "${where[@]}" --quiet || status=$((status ? status : $?))
fi
exit "$status"
