#!/usr/bin/env bash
# restore-vs-rclone.sh: `sandkeep restore --to DIR` beside `rclone copy` of the same
# tree from the same local S3-compatible server (benches/s3serve.rs: s3s-fs), in one run.
#
# A workspace of FILES files (default 10,000) holding MB MiB (default 100) in 50x7
# directories is synced once by the daemon. Then, REPS times (default 5), each into a
# new empty directory:
#   sandkeep restore --to DIR     manifest, parallel downloads (sync.concurrency = 16),
#                                 blake3 check of every file, modes and mtimes
#   rclone copy --transfers 16    the same objects (workspace/files/), MD5 checked
# and prints the medians and their ratio (target <= 1.0x). Both trees are compared
# with `diff -r` once. Every process is stopped and the temp dir removed on exit.
#
#   benches/restore-vs-rclone.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-5}
FILES=${FILES:-10000}
MB=${MB:-100}
PORT=${PORT:-$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')}
AK=AKBENCH SK=SKBENCH12345678 BUCKET=sandboxes
while read -r v; do unset "$v"; done < <(env | sed -n 's/^\(SANDKEEP_[A-Za-z0-9_]*\)=.*/\1/p')
unset AWS_CA_BUNDLE 2>/dev/null || true

TMP=$(mktemp -d "${TMPDIR:-/tmp}/restore-vs-rclone.XXXXXX")
S3_PID="" SK_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in $SK_PID $S3_PID; do kill -TERM "$p" 2>/dev/null || true; done
  for p in $SK_PID $S3_PID; do wait "$p" 2>/dev/null || true; done
  if [ "${KEEP_TMP:-0}" = 1 ]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
log() { echo "== $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

log "building sandkeep and s3serve (release)"
cargo build --release --bin sandkeep --bench s3serve --message-format=json-render-diagnostics > "$TMP/build.json"
exe_of() { grep '"reason":"compiler-artifact"' "$TMP/build.json" | grep "\"name\":\"$1\"" |
  sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1; }
SANDKEEP=$(exe_of sandkeep); S3SERVE=$(exe_of s3serve)
[ -x "$SANDKEEP" ] && [ -x "$S3SERVE" ] || { echo "cannot find the built binaries" >&2; exit 1; }
if ! command -v rclone >/dev/null; then
  log "installing rclone with apt-get"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone >/dev/null
fi
rclone version 2>/dev/null | sed -n 1p >&2

mkdir -p "$TMP/s3/$BUCKET"
"$S3SERVE" --port "$PORT" --root "$TMP/s3" --access-key "$AK" --secret-key "$SK" > "$TMP/s3.log" 2>&1 &
S3_PID=$!
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.1; done
export RCLONE_CONFIG_S3_TYPE=s3 RCLONE_CONFIG_S3_PROVIDER=Other RCLONE_CONFIG_S3_ENV_AUTH=false
export RCLONE_CONFIG_S3_ACCESS_KEY_ID=$AK RCLONE_CONFIG_S3_SECRET_ACCESS_KEY=$SK
export RCLONE_CONFIG_S3_ENDPOINT=http://127.0.0.1:$PORT RCLONE_CONFIG_S3_REGION=us-east-1
export RCLONE_CONFIG_S3_FORCE_PATH_STYLE=true


log "generating the workspace: $FILES files, $MB MiB"
python3 - "$TMP/ws" "$FILES" "$MB" <<'EOF'
import os, random, sys
root, n, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(42)
avg = (mb << 20) // n
for i in range(n):
    d = os.path.join(root, f"d{i % 50:02d}", f"s{i % 7}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}.bin"), "wb") as f:
        f.write(rnd.randbytes(rnd.randint(avg // 2, avg * 3 // 2)))
EOF
du -sh "$TMP/ws" >&2

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
  SANDKEEP_LOG=warn "$SANDKEEP" serve --config "$dir/sandkeep.toml" > "$dir/log" 2>&1 &
  SK_PID=$!
}
wait_synced() { # ready, then a sync barrier
  for _ in $(seq 6000); do
    curl -sf --unix-socket "$SK_SOCK" http://sk/readyz >/dev/null 2>&1 && break
    kill -0 "$SK_PID" 2>/dev/null || { echo "sandkeep died" >&2; exit 1; }
    sleep 0.01
  done
  curl -sf --max-time 600 --unix-socket "$SK_SOCK" -X POST -d '{"timeout_s": 600}' http://sk/v1/sync >/dev/null
}
stop_daemon() { kill -TERM "$SK_PID"; wait "$SK_PID" 2>/dev/null || true; SK_PID=""; }
rss_kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }


log "syncing it once with the daemon"
EXTRA_TOML='[sync]\nconcurrency = 16' start_daemon "$TMP/ws" restore; wait_synced; stop_daemon
CONFIG=$TMP/sk-restore/sandkeep.toml
# The trailing slash tells rclone the root is a directory: without it rclone first HEADs
# the path to see whether it names a file, which s3s-fs answers with a 500 after ~40 s.
SRC="s3:$BUCKET/conversations/bench/restore/workspace/files/"

declare -A T
for rep in $(seq "$REPS"); do
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  t=$(now); "$SANDKEEP" restore --config "$CONFIG" --to "$TMP/sk-out-$rep" > "$TMP/summary-$rep.json"
  T[sk]+=" $(since "$t")"
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  t=$(now); rclone copy --transfers 16 "$SRC" "$TMP/rc-out-$rep" 2>>"$TMP/rclone.log"
  T[rclone]+=" $(since "$t")"
  if [ "$rep" = 1 ]; then
    diff -r "$TMP/ws" "$TMP/sk-out-1" >/dev/null || { echo "sandkeep's restore differs from the workspace" >&2; exit 1; }
    diff -r "$TMP/ws" "$TMP/rc-out-1" >/dev/null || { echo "rclone's copy differs from the workspace" >&2; exit 1; }
    grep -q '"bad":\[\]' "$TMP/summary-1.json" || { echo "bad entries: $(cat "$TMP/summary-1.json")" >&2; exit 1; }
  fi
  rm -rf "$TMP/sk-out-$rep" "$TMP/rc-out-$rep"
done

m() { echo "${T[$1]:-}" | median; }
echo
echo "restore vs rclone $(rclone version 2>/dev/null | sed -n '1s/^rclone //p') on s3s-fs (loopback), $FILES files / $MB MiB, median of $REPS"
printf '%-36s %10s %10s %8s  %s\n' measurement sandkeep rclone ratio target
printf '%-36s %10s %10s %8s  %s\n' "restore into an empty dir (s)" "$(m sk)" "$(m rclone)" "$(ratio "$(m sk)" "$(m rclone)")" "<= 1.0x"
