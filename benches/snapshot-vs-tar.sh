#!/usr/bin/env bash
# Snapshots and git bundles beside the tools people would otherwise use, in one run:
#   - sandkeep's snapshot (tar + flate2/zlib-rs, level snapshot::LEVEL) vs GNU `tar -czf`
#     (and `tar | pigz` when pigz is installed) on a 10,000-file tree and a 100 MB tree;
#     also the daemon's whole path (bounded pipe into a `dir` remote, with fsync);
#   - sandkeep's bundle (git2 packbuilder, WIP commits included) vs
#     `git bundle create --all` on a repository with 500 commits and 2,000 files,
#     once with loose objects (as commits leave them) and once after `git gc`.
# Every figure is the best of RUNS runs (default 3) on a warm page cache.
# Targets: snapshot <= 1.0x `tar -czf`, bundle <= 1.5x git.
#
# Usage: benches/snapshot-vs-tar.sh [WORKDIR]   (default: a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
WORK=${1:-$(mktemp -d /tmp/sk-snapbench.XXXXXX)}
mkdir -p "$WORK"
echo "work dir: $WORK"

export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1
export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=bench@example.com
export GIT_COMMITTER_NAME=bench GIT_COMMITTER_EMAIL=bench@example.com

echo "building the bench binary (release)..."
BIN=$(cargo bench --no-run --bench snapshot_bench --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "snapshot_bench" and m.get("executable"):
        print(m["executable"])')
[ -x "$BIN" ] || { echo "cannot build benches/snapshot_bench.rs" >&2; exit 1; }

# Trees: deterministic, source-like text (compressible about 3-4x like real code).
python3 - "$WORK" <<'PY'
import os, random, sys
work = sys.argv[1]
rnd = random.Random(42)
words = [''.join(rnd.choice('abcdefghijklmnopqrstuvwxyz_') for _ in range(rnd.randint(2, 10)))
         for _ in range(5000)]
def text(n):
    out, size = [], 0
    while size < n:
        line = '    ' * rnd.randint(0, 3) + ' '.join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) + ';\n'
        out.append(line); size += len(line)
    return ''.join(out)[:n]
def tree(root, files, size_of):
    if os.path.exists(root):
        return
    for i in range(files):
        d = os.path.join(root, f"d{i % 50:02d}", f"s{i % 7}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:05d}.rs"), "w") as f:
            f.write(text(size_of(i)))
tree(os.path.join(work, "small"), 10_000, lambda i: 200 + (i * 7919) % 7800)
tree(os.path.join(work, "large"), 100, lambda i: 1_000_000)
PY

# The repository: 2,000 files, 500 commits (the first adds everything, each later one
# changes 5 files).
REPO="$WORK/repo"
if [ ! -d "$REPO/.git" ]; then
  python3 - "$REPO" <<'PY'
import os, random, subprocess, sys
repo = sys.argv[1]
rnd = random.Random(7)
os.makedirs(repo)
def git(*a):
    subprocess.run(["git", "-c", "init.defaultBranch=main", *a], cwd=repo, check=True,
                   stdout=subprocess.DEVNULL)
git("init", "-q")
def body(i, v):
    return ''.join(f"line {j} of file {i} version {v} {rnd.random():.6f}\n" for j in range(40))
for i in range(2000):
    d = os.path.join(repo, f"m{i % 40:02d}")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, f"f{i:04d}.txt"), "w").write(body(i, 0))
git("add", "-A"); git("commit", "-q", "-m", "commit 0")
for c in range(1, 500):
    for _ in range(5):
        i = rnd.randrange(2000)
        open(os.path.join(repo, f"m{i % 40:02d}", f"f{i:04d}.txt"), "w").write(body(i, c))
    git("commit", "-q", "-am", f"commit {c}")
PY
fi

best() { # best of RUNS: prints "<seconds> <bytes>" of the fastest run of "$@"
  local b="" bytes="" out s
  for _ in $(seq "$RUNS"); do
    out=$("$@")
    s=${out% *}
    if [ -z "$b" ] || python3 -c "import sys; sys.exit(0 if $s < $b else 1)"; then b=$s; bytes=${out#* }; fi
  done
  echo "$b $bytes"
}
timed() { # timed OUTFILE CMD...: runs CMD, prints "<seconds> <size of OUTFILE>"
  local out=$1; shift
  local t0=$EPOCHREALTIME
  "$@"
  local t1=$EPOCHREALTIME
  python3 -c "print(f'{$t1 - $t0:.3f}', end=' ')"
  stat -c %s "$out"
}
ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }
mb() { python3 -c "print(f'{$1 / 1e6:.1f} MB')"; }

printf '\n%-34s %9s %11s %8s\n' "case" "seconds" "size" "ratio"
row() { printf '%-34s %9s %11s %8s\n' "$1" "$2" "$(mb "$3")" "$4"; }

for t in small large; do
  src="$WORK/$t"
  files=$(find "$src" -type f | wc -l)
  bytes=$(du -sb "$src" | cut -f1)
  echo "--- $t tree: $files files, $(mb "$bytes")"
  read -r ts tb < <(best timed "$WORK/out-tar.tar.gz" tar -czf "$WORK/out-tar.tar.gz" -C "$src" .)
  row "GNU tar -czf" "$ts" "$tb" "1.00x"
  if command -v pigz >/dev/null 2>&1; then
    read -r ps pb < <(best timed "$WORK/out-pigz.tar.gz" sh -c "tar -cf - -C '$src' . | pigz > '$WORK/out-pigz.tar.gz'")
    row "tar | pigz" "$ps" "$pb" "$(ratio "$ps" "$ts")"
  else
    echo "(pigz not installed: skipped)"
  fi
  read -r ss sb < <(best "$BIN" snapshot-file "$src" "$WORK/out-sk.tar.gz")
  row "sandkeep snapshot (to a file)" "$ss" "$sb" "$(ratio "$ss" "$ts")"
  rm -rf "$WORK/remote"
  read -r rs rb < <(best "$BIN" snapshot-remote "$src" "$WORK/remote")
  row "sandkeep snapshot (dir remote)" "$rs" "$rb" "$(ratio "$rs" "$ts")"
  # The archive is valid for GNU tar.
  n=$(tar -tzf "$WORK/out-sk.tar.gz" | wc -l)
  echo "GNU tar reads sandkeep's archive: $n entries (files and directories)"
done

bundles() {
  echo "--- repository ($1): $(git -C "$REPO" rev-list --all | wc -l) commits, $(git -C "$REPO" ls-files | wc -l) files"
  read -r gs gb < <(best timed "$WORK/git.bundle" sh -c "cd '$REPO' && git bundle create -q '$WORK/git.bundle' --all")
  row "git bundle create --all" "$gs" "$gb" "1.00x"
  read -r ks kb < <(best "$BIN" bundle "$REPO" "$WORK/sk.bundle")
  row "sandkeep bundle" "$ks" "$kb" "$(ratio "$ks" "$gs")"
  (cd "$REPO" && git bundle verify -q "$WORK/sk.bundle") && echo "git bundle verify: ok"
}
# Loose objects, as the commits left them (git must compress and delta everything too).
if [ "$(git -C "$REPO" count-objects | cut -d' ' -f1)" != "0" ]; then
  bundles "loose objects"
fi
git -C "$REPO" gc -q
bundles "packed (after git gc)"
