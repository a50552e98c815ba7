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
BENCH=sync-vs-rclone
. benches/s3-bench-common.sh

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

declare -A T
IDLE_RSS=0 PEAK_RSS=0
# ---------------------------------------------------------------- 1. initial sync
want init && for rep in $(seq "$REPS"); do
  use_bucket "rclone-small-$rep"
  t=$(now); rclone sync --transfers 16 "$TMP/ws-small" "s3:$BUCKET/small" 2>>"$TMP/rclone.log"
  T[rclone_init]+=" $(since "$t")"
  use_bucket "sk-small-$rep"
  t=$(now); start_daemon "$TMP/ws-small" "small-$rep"; wait_synced
  T[sk_init]+=" $(since "$t")"
  if [ "$rep" = "$REPS" ]; then
    # ---------------------------------------------------------- 5. idle RSS
    sleep 5
    IDLE_RSS=$(rss_kib "$SK_PID" VmRSS)
    # ---------------------------------------------------------- 2. one file changed
    f=d07/s0/f00007.txt
    obj=$S3ROOT/$BUCKET/conversations/bench/small-$rep/workspace/files/$f
    for i in 1 2 3; do
      echo "change $i $(now)" > "$TMP/ws-small/$f"
      t=$(now)
      for _ in $(seq 3000); do cmp -s "$obj" "$TMP/ws-small/$f" && break; sleep 0.005; done
      T[sk_one]+=" $(since "$t")"
      sleep 3
    done
    stop_daemon
    use_bucket "rclone-small-$rep"
    for i in 1 2 3; do
      echo "rclone change $i $(now)" > "$TMP/ws-small/$f"
      t=$(now); rclone sync --transfers 16 "$TMP/ws-small" "s3:$BUCKET/small" 2>>"$TMP/rclone.log"
      T[rclone_one]+=" $(since "$t")"
    done
  fi
  stop_daemon
done

# ---------------------------------------------------------------- 3. 100 MB file
want 100m && for rep in $(seq "$REPS"); do
  use_bucket "rclone-100m-$rep"
  t=$(now); rclone copy --transfers 16 "$TMP/ws-100m" "s3:$BUCKET/100m" 2>>"$TMP/rclone.log"
  T[rclone_100m]+=" $(since "$t")"
  use_bucket "sk-100m-$rep"
  t=$(now); start_daemon "$TMP/ws-100m" "100m-$rep"; wait_synced
  T[sk_100m]+=" $(since "$t")"
  stop_daemon
done

# ---------------------------------------------------------------- 4. 1 GiB peak RSS
if want rss; then
  use_bucket sk-1g
  start_daemon "$TMP/ws-1g" "1g"; wait_synced
  PEAK_RSS=$(rss_kib "$SK_PID" VmHWM)
  stop_daemon
fi

# ---------------------------------------------------------------- 6. SIGTERM, 1,000 pending
SIGTERM_CODES=""
want sigterm && for rep in $(seq "$REPS"); do
  ws=$TMP/ws-term-$rep; mkdir -p "$ws"
  use_bucket "sk-term-$rep"
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
  T[sk_term]+=" $(since "$t")"; SK_PID=""; unset 'PID[sandkeep]'
  SIGTERM_CODES+=" $code"
  n=$(find "$S3ROOT/$BUCKET/conversations/bench/term-$rep/workspace/files" -type f | wc -l)
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
