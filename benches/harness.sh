# harness.sh: what the benchmark scripts share. Sourced after `cd` to the project root,
# with BENCH set to the script's name. Unsets the caller's SANDKEEP_* variables (the
# daemons must see only their temp config), makes $TMP (removed on exit, failure or
# Ctrl-C, with every process registered in PID; KEEP_TMP=1 keeps it) and defines:
#   PID            NAME -> pid of each process to stop on exit (unset an entry once
#                  the script stopped that process itself)
#   stop_pid PID NAME    TERM, wait up to 30 s, then KILL
#   log MSG
#   build_release CARGO-TARGETS...   a release build, its report in $TMP/build.json
#   exe_of TARGET-NAME   the executable that build reported for it
while read -r v; do unset "$v"; done < <(env | sed -n 's/^\(SANDKEEP_[A-Za-z0-9_]*\)=.*/\1/p')

TMP=$(mktemp -d "${TMPDIR:-/tmp}/$BENCH.XXXXXX")
declare -A PID=()

stop_pid() {
  local pid=$1 name=$2
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "warning: $name ($pid) ignored SIGTERM for 30 s: killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for name in "${!PID[@]}"; do stop_pid "${PID[$name]}" "$name"; done
  if [ "${KEEP_TMP:-0}" = 1 ]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { echo "== $*" >&2; }

build_release() {
  cargo build --release "$@" --message-format=json-render-diagnostics > "$TMP/build.json"
}
exe_of() {
  grep '"reason":"compiler-artifact"' "$TMP/build.json" | grep "\"name\":\"$1\"" |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1
}
