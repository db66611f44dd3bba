# Helpers shared by the launchers (sourced, not run).

usage_error() {
  echo "error: $1" >&2
  usage >&2
  exit 2
}

# One argument, quoted for a POSIX shell only when it needs it.
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

qjoin() {
  local out=() a
  for a in "$@"; do out+=("$(q "$a")"); done
  printf '%s\n' "${out[*]}"
}
