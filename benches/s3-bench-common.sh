# s3-bench-common.sh: sourced by sync-vs-rclone.sh and restore-vs-rclone.sh (after
# `cd` to the project root, with BENCH set to the script's name). On top of
# benches/harness.sh ($TMP, PID, stop_pid, log, exe_of) it builds sandkeep and
# benches/s3serve.rs (release), installs rclone with apt-get when missing (as root),
# starts s3serve on a free port, points rclone's `s3:` remote at it, and defines:
#   now, since T0, median (stdin), ratio A B,
#   start_daemon WORKSPACE NAME (sets SK_PID, SK_SOCK; EXTRA_TOML is appended to its
#   config), wait_synced, stop_daemon, rss_kib PID FIELD, use_bucket NAME.
# use_bucket NAME runs s3serve on a root of its own for bucket NAME (kept, so a later
# use_bucket NAME finds its objects again) and makes NAME $BUCKET, in $S3ROOT/$BUCKET.
# Each measured run gets its own: s3s-fs keeps a metadata file per object in its root
# directory and walks the whole bucket for every listing page, so a server that already
# holds the other side's objects is slower (and the side measured second paid for it).
# BENCH_SANDKEEP=PATH measures another sandkeep binary (an A/B against a build of an
# earlier commit) instead of the one built here; BENCH_LOG=info (default warn) is the
# daemons' log level (their logs are in $TMP/sk-NAME/log, kept with KEEP_TMP=1).
. benches/harness.sh
PORT=${PORT:-$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')}
AK=AKBENCH SK=SKBENCH12345678 BUCKET=sandboxes
unset AWS_CA_BUNDLE 2>/dev/null || true
SK_PID=""
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

log "building sandkeep and s3serve (release)"
build_release --bin sandkeep --bench s3serve
SANDKEEP=${BENCH_SANDKEEP:-$(exe_of sandkeep)}; S3SERVE=$(exe_of s3serve)
[ -x "$SANDKEEP" ] && [ -x "$S3SERVE" ] || { echo "cannot find the built binaries" >&2; exit 1; }
if ! command -v rclone >/dev/null; then
  log "installing rclone with apt-get"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone >/dev/null
fi
rclone version 2>/dev/null | sed -n 1p >&2

use_bucket() {
  stop_pid "${PID[s3serve]:-}" s3serve
  BUCKET=$1 S3ROOT=$TMP/s3-$1
  mkdir -p "$S3ROOT/$BUCKET"
  "$S3SERVE" --port "$PORT" --root "$S3ROOT" --access-key "$AK" --secret-key "$SK" >> "$TMP/s3.log" 2>&1 &
  PID[s3serve]=$!
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.1; done
}
use_bucket "$BUCKET"
export RCLONE_CONFIG_S3_TYPE=s3 RCLONE_CONFIG_S3_PROVIDER=Other RCLONE_CONFIG_S3_ENV_AUTH=false
export RCLONE_CONFIG_S3_ACCESS_KEY_ID=$AK RCLONE_CONFIG_S3_SECRET_ACCESS_KEY=$SK
export RCLONE_CONFIG_S3_ENDPOINT=http://127.0.0.1:$PORT RCLONE_CONFIG_S3_REGION=us-east-1
export RCLONE_CONFIG_S3_FORCE_PATH_STYLE=true

# start_daemon WORKSPACE NAME: a fresh state dir and conversation; sets SK_PID, SK_SOCK
start_daemon() {
  local ws=$1 name=$2 dir=$TMP/sk-$2
  rm -rf "$dir"; mkdir -p "$dir"
  SK_SOCK=$dir/s.sock
  cat > "$dir/sandkeep.toml" <<EOT
socket = "$SK_SOCK"
state_dir = "$dir/state"
workspace = "$ws"
restore = "never"
[identity]
user = "bench"
conversation = "$name"
[remote]
kind = "s3"
bucket = "$BUCKET"
endpoint = "http://127.0.0.1:$PORT"
access_key_id = "$AK"
secret_access_key = "$SK"
EOT
  if [ -n "${EXTRA_TOML:-}" ]; then printf '%b\n' "$EXTRA_TOML" >> "$dir/sandkeep.toml"; fi
  SANDKEEP_LOG=${BENCH_LOG:-warn} "$SANDKEEP" serve --config "$dir/sandkeep.toml" > "$dir/log" 2>&1 &
  SK_PID=$!
  PID[sandkeep]=$SK_PID
}
wait_synced() { # ready, then a sync barrier
  for _ in $(seq 6000); do
    curl -sf --unix-socket "$SK_SOCK" http://sk/readyz >/dev/null 2>&1 && break
    kill -0 "$SK_PID" 2>/dev/null || { echo "sandkeep died" >&2; exit 1; }
    sleep 0.01
  done
  curl -sf --max-time 600 --unix-socket "$SK_SOCK" -X POST -d '{"timeout_s": 600}' http://sk/v1/sync >/dev/null
}
# stop_daemon: TERM (then KILL after 30 s) and wait; nothing when none is running
stop_daemon() { stop_pid "$SK_PID" sandkeep; SK_PID=""; unset 'PID[sandkeep]'; }
rss_kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }

