#!/usr/bin/env bash
# sync-vs-rclone.sh: sandkeep's workspace mirror beside rclone, against the same local
# S3-compatible server (benches/s3serve.rs: s3s-fs with TCP_NODELAY), in one run.
#
# Measures and prints, with ratios and the targets of the sync issue:
#   1. initial sync of 10,000 small files (1-8 KiB): sandkeep start -> ready -> POST
#      /v1/sync answered, vs `rclone sync --transfers 16` (target <= 1.0x)
#   2. one file changed among 10,000: time until the new content is in the bucket
#      (sandkeep running with the default debounce_min = 2 s; target <= 2.3 s), vs an
#      `rclone sync` rerun (target: sandkeep >= 20x faster)
#   3. one 100 MB file: sandkeep start -> synced, vs `rclone copy`
#   4. peak RSS (VmHWM) of the daemon while uploading a 1 GiB file (target <= 96 MiB)
#   5. RSS of the daemon idle, watching the 10,000 files (target <= 40 MiB)
#   6. SIGTERM to exit with 1,000 files written just before (pending, inside a long
#      debounce) plus KV and file store writes: the final sync carries them (exit 0)
# Times are the median of REPS runs (default 3). Every process is stopped and the temp
# dir removed on exit (KEEP_TMP=1 keeps it).
#
# Run from any directory (root installs rclone with apt-get when it is missing):
#   benches/sync-vs-rclone.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
ONLY=${ONLY:-init,100m,rss,sigterm}   # init (with the 1-file change and idle RSS), 100m, rss (1 GiB), sigterm
want() { case ",$ONLY," in *",$1,"*) return 0;; *) return 1;; esac; }
FILES=${FILES:-10000}
PORT=${PORT:-$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')}
AK=AKBENCH SK=SKBENCH12345678 BUCKET=sandboxes
while read -r v; do unset "$v"; done < <(env | sed -n 's/^\(SANDKEEP_[A-Za-z0-9_]*\)=.*/\1/p')
unset AWS_CA_BUNDLE 2>/dev/null || true

TMP=$(mktemp -d "${TMPDIR:-/tmp}/sync-vs-rclone.XXXXXX")
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

# ---------------------------------------------------------------- workspaces
log "generating workspaces"
python3 - "$TMP" "$FILES" "$ONLY" <<'EOF'
import os, random, sys
tmp, n, only = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
rnd = random.Random(42)
small = os.path.join(tmp, "ws-small")
for i in range(n if "init" in only else 0):
    d = os.path.join(small, f"d{i % 50:02d}", f"s{i % 7}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}.txt"), "wb") as f:
        f.write(rnd.randbytes(rnd.randint(1024, 8192)))
for name, size, want in (("ws-100m", 100 << 20, "100m"), ("ws-1g", 1 << 30, "rss")):
    if want not in only:
        continue
    os.makedirs(os.path.join(tmp, name), exist_ok=True)
    with open(os.path.join(tmp, name, "blob.bin"), "wb") as f:
        chunk = rnd.randbytes(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
EOF

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

declare -A T
IDLE_RSS=0 PEAK_RSS=0
# ---------------------------------------------------------------- 1. initial sync
want init && for rep in $(seq "$REPS"); do
  t=$(now); rclone sync --transfers 16 "$TMP/ws-small" "s3:$BUCKET/rclone/small-$rep" 2>>"$TMP/rclone.log"
  T[rclone_init]+=" $(since "$t")"
  t=$(now); start_daemon "$TMP/ws-small" "small-$rep"; wait_synced
  T[sk_init]+=" $(since "$t")"
  if [ "$rep" = "$REPS" ]; then
    # ---------------------------------------------------------- 5. idle RSS
    sleep 5
    IDLE_RSS=$(rss_kib "$SK_PID" VmRSS)
    # ---------------------------------------------------------- 2. one file changed
    f=d07/s0/f00007.txt
    obj=$TMP/s3/$BUCKET/conversations/bench/small-$rep/workspace/files/$f
    for i in 1 2 3; do
      echo "change $i $(now)" > "$TMP/ws-small/$f"
      t=$(now)
      for _ in $(seq 3000); do cmp -s "$obj" "$TMP/ws-small/$f" && break; sleep 0.005; done
      T[sk_one]+=" $(since "$t")"
      sleep 3
    done
    for i in 1 2 3; do
      echo "rclone change $i $(now)" > "$TMP/ws-small/$f"
      t=$(now); rclone sync --transfers 16 "$TMP/ws-small" "s3:$BUCKET/rclone/small-$rep" 2>>"$TMP/rclone.log"
      T[rclone_one]+=" $(since "$t")"
    done
  fi
  stop_daemon
done

# ---------------------------------------------------------------- 3. 100 MB file
want 100m && for rep in $(seq "$REPS"); do
  t=$(now); rclone copy --transfers 16 "$TMP/ws-100m" "s3:$BUCKET/rclone/100m-$rep" 2>>"$TMP/rclone.log"
  T[rclone_100m]+=" $(since "$t")"
  t=$(now); start_daemon "$TMP/ws-100m" "100m-$rep"; wait_synced
  T[sk_100m]+=" $(since "$t")"
  stop_daemon
done

# ---------------------------------------------------------------- 4. 1 GiB peak RSS
if want rss; then
  start_daemon "$TMP/ws-1g" "1g"; wait_synced
  PEAK_RSS=$(rss_kib "$SK_PID" VmHWM)
  stop_daemon
fi

# ---------------------------------------------------------------- 6. SIGTERM, 1,000 pending
SIGTERM_CODES=""
want sigterm && for rep in $(seq "$REPS"); do
  ws=$TMP/ws-term-$rep; mkdir -p "$ws"
  EXTRA_TOML='[sync]\ndebounce_min = "60s"\ndebounce_max = "120s"\n[kv]\nreplicate_delay = "1h"' \
    start_daemon "$ws" "term-$rep"; wait_synced
  python3 - "$ws" <<'EOF2'
import os, random, sys
rnd = random.Random(7)
for i in range(1000):
    d = os.path.join(sys.argv[1], f"d{i % 20:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"p{i:04d}.txt"), "wb") as f:
        f.write(rnd.randbytes(rnd.randint(1024, 8192)))
EOF2
  for i in $(seq 20); do
    curl -sf --unix-socket "$SK_SOCK" -X PUT -d "{\"i\": $i}" "http://sk/v1/kv/k$i?ns=bench" >/dev/null
    curl -sf --unix-socket "$SK_SOCK" -X PUT --data-binary "event $i" "http://sk/v1/files/events/e$i.json" >/dev/null
  done
  t=$(now); kill -TERM "$SK_PID"; code=0; wait "$SK_PID" || code=$?
  T[sk_term]+=" $(since "$t")"; SK_PID=""
  SIGTERM_CODES+=" $code"
  n=$(find "$TMP/s3/$BUCKET/conversations/bench/term-$rep/workspace/files" -type f | wc -l)
  [ "$n" = 1000 ] || echo "warning: $n of 1000 files in the bucket after SIGTERM" >&2
done

m() { echo "${T[$1]:-}" | median; }
echo
echo "sandkeep vs rclone $(rclone version 2>/dev/null | sed -n '1s/^rclone //p') on s3s-fs (loopback, TCP_NODELAY), median of $REPS"
printf '%-44s %10s %10s %8s  %s\n' measurement sandkeep rclone ratio target
printf '%-44s %10s %10s %8s  %s\n' "initial sync, $FILES small files (s)" "$(m sk_init)" "$(m rclone_init)" "$(ratio "$(m sk_init)" "$(m rclone_init)")" "<= 1.0x"
printf '%-44s %10s %10s %8s  %s\n' "1 file changed: in the remote after (s)" "$(m sk_one)" "$(m rclone_one)" "$(ratio "$(m rclone_one)" "$(m sk_one)")x faster" "<= 2.3 s and >= 20x"
printf '%-44s %10s %10s %8s  %s\n' "one 100 MB file (s)" "$(m sk_100m)" "$(m rclone_100m)" "$(ratio "$(m sk_100m)" "$(m rclone_100m)")" "-"
printf '%-44s %10s %10s %8s  %s\n' "peak RSS uploading 1 GiB (MiB)" "$((PEAK_RSS / 1024))" "-" "-" "<= 96 MiB"
printf '%-44s %10s %10s %8s  %s\n' "idle RSS watching $FILES files (MiB)" "$((IDLE_RSS / 1024))" "-" "-" "<= 40 MiB"
printf '%-44s %10s %10s %8s  %s\n' "SIGTERM to exit, 1,000 pending files (s)" "$(m sk_term)" "-" "-" "< shutdown.deadline (25 s); exit codes:$SIGTERM_CODES"
echo "(sandkeep's initial sync includes daemon start and the startup reconcile; rclone's includes its process start)"
