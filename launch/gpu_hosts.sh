#!/usr/bin/env bash
# Run a command as one JAX process per GPU host, over ssh.
#
#   bash launch/gpu_hosts.sh --hosts h1,h2,... [--port 1234] [--dir rallrec_jax]
#       [--coordinator ADDR] [--dry-run] -- python -m rallrec_jax.main --config ... --workdir ...
#
# See usage() below. The --workdir must be a folder every host sees (NFS): process 0 writes the
# artifacts, the others read them.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash launch/gpu_hosts.sh --hosts H1,H2,... [options] -- COMMAND...

Copies this checkout (rsync over ssh, without .git and git-ignored files) to DIR on every host,
runs `bash launch/setup_host.sh cuda12` on each, then starts COMMAND on every host at once in
DIR's .venv with RALLREC_DISTRIBUTED=1, RALLREC_COORDINATOR=<first host>:PORT,
RALLREC_NUM_PROCESSES=<hosts> and RALLREC_PROCESS_ID=<index of the host>. Output comes back
prefixed with the host (each host also keeps DIR/logs/run.log); the script waits for every
host and fails, naming them, when any fails. The hosts need passwordless ssh (BatchMode).

Options:
  --hosts H1,H2,...    ssh destinations ([user@]host), process 0 first (required)
  --port PORT          coordinator port on the first host (default: 1234)
  --coordinator ADDR   coordinator host name as the others reach it (default: the first host)
  --dir DIR            checkout folder on the hosts, relative to the remote home unless
                       absolute (default: rallrec_jax; quote a leading ~)
  --dry-run            print each ssh/rsync command, one per line, shell-quoted; run nothing
  -h, --help           this text

Example:
  bash launch/gpu_hosts.sh --hosts gpu1,gpu2 -- python -m rallrec_jax.main \
    --config configs/ml1m.py:path=/nfs/data/ml-1m --workdir /nfs/workdirs/ml1m
EOF
}

# usage_error (after the script's own usage), q and qjoin (shell quoting).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

hosts_arg="" port=1234 dir=rallrec_jax coordinator="" dry_run=0
cmd=()
while (($#)); do
  case "$1" in
    --hosts|--port|--dir|--coordinator)
      (($# >= 2)) || usage_error "$1 needs a value"
      case "$1" in
        --hosts) hosts_arg=$2 ;;
        --port) port=$2 ;;
        --dir) dir=$2 ;;
        --coordinator) coordinator=$2 ;;
      esac
      shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; cmd=("$@"); break ;;
    *) usage_error "unknown argument '$1' (the command goes after --)" ;;
  esac
done

[ -n "$hosts_arg" ] || usage_error "missing --hosts"
((${#cmd[@]})) || usage_error "missing the command after --"
[[ $port =~ ^[0-9]+$ ]] || usage_error "--port '$port' is not a number"
IFS=, read -r -a hosts <<<"$hosts_arg"
for host in "${hosts[@]}"; do
  [[ $host =~ ^[A-Za-z0-9_.@:-]+$ ]] || usage_error "--hosts: bad host name '$host'"
done
((${#hosts[@]})) || usage_error "--hosts lists no host"
dir=${dir#\~/}
[ -n "$coordinator" ] || coordinator=${hosts[0]#*@}

if ((!dry_run)); then
  for tool in ssh rsync; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found" >&2; exit 1; }
  done
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ssh_opts=(-o BatchMode=yes)

do_cmd() {
  if ((dry_run)); then qjoin "$@"; else "$@"; fi
}

# Runs `ssh HOST REMOTE` on every host at once, output prefixed with the host; fails, naming
# the hosts, when any fails. REMOTE is what the function named in $1 prints for a host index.
on_all_hosts() {
  local build=$1 i pids=() failed=()
  for i in "${!hosts[@]}"; do
    if ((dry_run)); then
      qjoin ssh "${ssh_opts[@]}" "${hosts[i]}" "$("$build" "$i")"
    else
      # shellcheck disable=SC2029  # the remote command is built here on purpose
      (set -o pipefail
       ssh "${ssh_opts[@]}" "${hosts[i]}" "$("$build" "$i")" </dev/null 2>&1 |
         while IFS= read -r line; do printf '[%s] %s\n' "${hosts[i]}" "$line"; done) &
      pids+=($!)
    fi
  done
  for i in "${!pids[@]}"; do
    wait "${pids[i]}" || failed+=("${hosts[i]} (process $i, exit $?)")
  done
  if ((${#failed[@]})); then
    echo "error: failed on ${failed[*]}" >&2
    return 1
  fi
}

setup_command() {
  echo "cd $(q "$dir") && bash launch/setup_host.sh cuda12"
}

run_command() {
  local env inner
  env="RALLREC_DISTRIBUTED=1 RALLREC_COORDINATOR=$(q "$coordinator:$port")"
  env+=" RALLREC_NUM_PROCESSES=${#hosts[@]} RALLREC_PROCESS_ID=$1 PYTHONUNBUFFERED=1"
  inner="cd $(q "$dir") && mkdir -p logs && . .venv/bin/activate && export $env"
  inner+=" && $(qjoin "${cmd[@]}") 2>&1 | tee logs/run.log"
  echo "bash -o pipefail -c $(q "$inner")"
}

trap 'trap - INT TERM; kill $(jobs -p) 2>/dev/null || true; exit 130' INT TERM
for host in "${hosts[@]}"; do
  do_cmd rsync -az --exclude=.git --filter=':- .gitignore' -e "ssh ${ssh_opts[*]}" \
    --rsync-path="mkdir -p $(q "$dir") && rsync" "$repo/" "$host:$dir/" ||
    { echo "error: copying the checkout to $host failed" >&2; exit 1; }
done
on_all_hosts setup_command
on_all_hosts run_command
