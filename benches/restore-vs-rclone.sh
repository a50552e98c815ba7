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

BENCH=restore-vs-rclone
. benches/s3-bench-common.sh

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
