#!/usr/bin/env bash
# kv-vs-redis.sh: sandkeep's KV API against Redis on this machine, in one run.
#
# What it measures: throughput (ops/s) and latency of GET, SET and INCR with 50 and 1
# concurrent clients, no pipelining, over Unix sockets, for
#   - sandkeep (release build; durable writes: one group-committed redb fsync), driven by
#     benches/kvload.rs: keep-alive HTTP/1.1 connections, GET/PUT /v1/kv/key:NNNNNN
#     uniformly over 10,000 preloaded keys (3-byte values), POST /v1/kv/counter/incr on
#     a single key;
#   - redis-server with `appendonly no` + `save ""` (volatile) and with `appendonly yes`
#     + `appendfsync always` (every write fsynced before the reply), driven by
#     redis-benchmark with the same C and N, `-d 3`, `-r 10000` for GET/SET (10,000
#     preloaded keys, like kvload's) and a single key for INCR.
# The three servers run side by side (idle when not measured) and every cell is measured
# back to back on the three (REPS rounds, median reported), so that load from other
# processes on the machine hits all sides alike. It prints ops/s and ratios with the
# targets GET >= 0.5x redis (no AOF) and durable SET >= 1.0x redis (appendfsync always)
# at C=50; then latencies and the CPU time per operation of each server and of its load
# generator; and the disk's fdatasync rate and how much CPU other processes took.
# All data lives in one temp dir (one filesystem for all servers); every process the
# script starts is stopped and the temp dir removed on exit, failure or Ctrl-C.
#
# Run (from any directory; as root it installs redis with apt-get when missing):
#   benches/kv-vs-redis.sh
# Environment knobs: N50 (requests at C=50, default 100000), N1 (at C=1, default 20000),
#   REPS (rounds, median reported; default 3), KEEP_TMP=1 (keep the temp dir).
# The release build takes ~6 min from scratch on a 2-core machine; the runs ~4 min.
set -euo pipefail
cd "$(dirname "$0")/.."

N50=${N50:-100000}
N1=${N1:-20000}
REPS=${REPS:-3}
KEYS=10000
VALUE_SIZE=3
SIDES="sandkeep noaof always"
BENCH=kv-vs-redis
. benches/harness.sh

# ---------------------------------------------------------------------------- build
log "building sandkeep and the kvload bench (release)"
build_release --bin sandkeep --bench kvload
SANDKEEP=$(exe_of sandkeep)
KVLOAD=$(exe_of kvload)
[ -x "$SANDKEEP" ] && [ -x "$KVLOAD" ] || { echo "cannot find the built binaries" >&2; exit 1; }
log "sandkeep: $SANDKEEP"
log "kvload:   $KVLOAD"

# ---------------------------------------------------------------------------- redis
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null ||
  ! command -v redis-cli >/dev/null; then
  log "installing redis-server, redis-cli and redis-benchmark with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi

# ---------------------------------------------------------------------------- accounting
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # user+system ticks of PID (0 when it is gone)
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  s=${s##*) }
  awk '{print $12 + $13}' <<<"$s"
}
children_ticks() { # CPU ticks of this shell's reaped children (the load generators)
  local s
  s=$(cat /proc/$$/stat)
  s=${s##*) }
  awk '{print $14 + $15}' <<<"$s"
}
machine_ticks() { # busy ticks of all CPUs: user nice system irq softirq steal
  awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}
us_per_op() { awk -v t="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }'; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "-"; else print a[int((NR + 1) / 2)] }'; }
ms_to_us() { awk -v x="$1" 'BEGIN { printf "%.1f", x * 1000 }'; }
jget() { sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" <<<"$1" | tr -d '"'; }

declare -A OPS LAT CPU_SRV CPU_CLI ERR
NERR=0
# record SIDE OP C OPS P50 P99 SRV_US CLI_US: one measurement (medians taken later)
record() {
  local k="$1|$2|$3"
  OPS[$k]+=" $4"; LAT[$k]+=" $5/$6"; CPU_SRV[$k]+=" $7"; CPU_CLI[$k]+=" $8"
}
fail() { # fail SIDE OP C MESSAGE
  ERR["$1|$2|$3"]="$4"; NERR=$((NERR + 1))
}

# ---------------------------------------------------------------------------- disk
# The fdatasync rate bounds durable writes with one client (one fsync per write).
dd if=/dev/zero of="$TMP/dd.test" bs=4k count=1000 oflag=dsync 2> "$TMP/dd.out" >/dev/null
DD_RATE=$(awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "s,") print int(1000 / $(i - 1)) }' "$TMP/dd.out")
rm -f "$TMP/dd.test"

# ---------------------------------------------------------------------------- servers
SK_DIR=$TMP/sandkeep
mkdir -p "$SK_DIR/state" "$SK_DIR/workspace" "$SK_DIR/remote"
SK_SOCK=$SK_DIR/sandkeep.sock
cat > "$SK_DIR/sandkeep.toml" <<EOF
socket = "$SK_SOCK"
socket_mode = "0600"
state_dir = "$SK_DIR/state"
workspace = "$SK_DIR/workspace"
restore = "never"

[identity]
user = "bench"
conversation = "kv"

[remote]
kind = "dir"
path = "$SK_DIR/remote"

[auth]
mode = "none"
EOF
log "starting sandkeep"
RUST_LOG=${RUST_LOG:-warn} "$SANDKEEP" serve --config "$SK_DIR/sandkeep.toml" > "$SK_DIR/log" 2>&1 &
PID[sandkeep]=$!
ready=""
for _ in $(seq 300); do
  kill -0 "${PID[sandkeep]}" 2>/dev/null || break
  if curl -sf --max-time 2 --unix-socket "$SK_SOCK" http://sandkeep/readyz >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.1
done
if [ -z "$ready" ]; then
  echo "sandkeep did not become ready; its log:" >&2; cat "$SK_DIR/log" >&2; exit 1
fi

start_redis() { # start_redis LABEL EXTRA-ARGS...
  local label=$1; shift
  local dir=$TMP/$label
  mkdir -p "$dir"
  log "starting redis-server ($label: $*)"
  redis-server --port 0 --unixsocket "$dir/redis.sock" --unixsocketperm 700 --dir "$dir" \
    --save '' --daemonize no --logfile "$dir/log" "$@" &
  PID[$label]=$!
  for _ in $(seq 100); do [ -S "$dir/redis.sock" ] && break; sleep 0.1; done
  [ -S "$dir/redis.sock" ] || { echo "redis-server did not start:" >&2; cat "$dir/log" >&2; exit 1; }
}
start_redis noaof --appendonly no
start_redis always --appendonly yes --appendfsync always

# Preload the key spaces (untimed): kvload PUTs every key then does one GET (the timed
# runs use --no-preload); redis gets the keys redis-benchmark -r uses, key:%012d.
log "preloading $KEYS keys on each server"
"$KVLOAD" --socket "$SK_SOCK" --ns bench --op get --connections 1 --requests 1 \
  --keys "$KEYS" --value-size "$VALUE_SIZE" >&2
VALUE=$(head -c "$VALUE_SIZE" /dev/zero | tr '\0' x)
for label in noaof always; do
  for ((i = 0; i < KEYS; i++)); do printf 'SET key:%012d %s\n' "$i" "$VALUE"; done |
    redis-cli -s "$TMP/$label/redis.sock" --pipe >&2
done

# ---------------------------------------------------------------------------- measure
measure() { # measure SIDE OP C N ROUND
  local side=$1 op=$2 C=$3 N=$4 round=$5 out line rc=0 s0 s1 c0 c1
  local pid=${PID[$side]}
  s0=$(cpu_ticks "$pid"); c0=$(children_ticks)
  if [ "$side" = sandkeep ]; then
    out=$("$KVLOAD" --socket "$SK_SOCK" --ns bench --op "$op" --connections "$C" --requests "$N" \
      --keys "$KEYS" --value-size "$VALUE_SIZE" --no-preload --json) || rc=$?
  else
    local rnd=(-r "$KEYS"); [ "$op" = incr ] && rnd=()
    out=$(redis-benchmark -s "$TMP/$side/redis.sock" -c "$C" -n "$N" -d "$VALUE_SIZE" "${rnd[@]}" \
      -t "$op" --csv 2>&1) || rc=$?
  fi
  s1=$(cpu_ticks "$pid"); c1=$(children_ticks)
  local srv cli
  srv=$(us_per_op $((s1 - s0)) "$N"); cli=$(us_per_op $((c1 - c0)) "$N")
  if [ "$side" = sandkeep ]; then
    echo "round $round $side $op C=$C: $out" >&2
    if [ "$rc" -ne 0 ] || [ "$(jget "$out" status)" != ok ]; then
      fail "$side" "$op" "$C" "kvload rc=$rc: ${out:-no output}"
      return
    fi
    record "$side" "$op" "$C" "$(jget "$out" ops_per_sec)" \
      "$(printf %.1f "$(jget "$out" p50_us)")" "$(printf %.1f "$(jget "$out" p99_us)")" "$srv" "$cli"
  else
    line=$(grep -i "^\"${op}\"" <<<"$out" | tail -1 || true)
    echo "round $round redis-$side $op C=$C: $line" >&2
    if [ "$rc" -ne 0 ] || [ -z "$line" ]; then
      fail "$side" "$op" "$C" "redis-benchmark rc=$rc: $out"
      return
    fi
    local f p50=- p99=-
    IFS=, read -r -a f <<<"$(tr -d '"' <<<"$line")"
    # redis 7 CSV: test,rps,avg,min,p50,p95,p99,max (ms); redis 6: test,rps
    if [ "${#f[@]}" -ge 7 ]; then p50=$(ms_to_us "${f[4]}"); p99=$(ms_to_us "${f[6]}"); fi
    record "$side" "$op" "$C" "${f[1]}" "$p50" "$p99" "$srv" "$cli"
  fi
}

M0=$(machine_ticks); W0=$(date +%s.%N); OURS0=$(children_ticks)
for side in $SIDES; do OURS0=$((OURS0 + $(cpu_ticks "${PID[$side]}"))); done
for round in $(seq "$REPS"); do
  log "round $round of $REPS"
  for C in 50 1; do
    N=$N50; [ "$C" = 1 ] && N=$N1
    for op in get set incr; do
      for side in $SIDES; do measure "$side" "$op" "$C" "$N" "$round"; done
    done
  done
done
M1=$(machine_ticks); W1=$(date +%s.%N); OURS1=$(children_ticks)
for side in $SIDES; do OURS1=$((OURS1 + $(cpu_ticks "${PID[$side]}"))); done

# ---------------------------------------------------------------------------- report
val() { local v; v=$(median <<<"${OPS[$1]:-}"); echo "${v:--}"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2fx", a / b }'; }
fmt_ops() { if [ "$1" = - ]; then echo -; else printf "%.0f" "$1"; fi; }
lat_of() { # the p50/p99 pair of the run with the median p50
  local pairs=${LAT[$1]:-}
  [ -n "$pairs" ] || { echo "-"; return; }
  tr ' ' '\n' <<<"$pairs" | grep -v '^$' | sort -t/ -g -k1 | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'
}
verdict() { # verdict RATIO MIN LABEL
  awk -v r="${1%x}" -v m="$2" -v l="$3" 'BEGIN { if (r == "-") print l ": n/a"; else print l ": " (r + 0 >= m ? "MET" : "MISSED") }'
}
echo
echo "kv-vs-redis on $(nproc) cores, $(uname -r); $(redis-server --version | cut -d' ' -f1-3)"
echo "N=$N50 at C=50, N=$N1 at C=1; value $VALUE_SIZE bytes; GET/SET uniform over $KEYS preloaded keys," \
  "INCR on one key; median of $REPS round(s), sides measured back to back"
echo "data dir: $(df -T "$TMP" | awk 'NR == 2 { print $2 }'), ${DD_RATE:-?} fdatasync'd 4 KiB writes/s (dd oflag=dsync)"
awk -v m="$((M1 - M0))" -v o="$((OURS1 - OURS0))" -v hz="$CLK_TCK" -v w0="$W0" -v w1="$W1" -v n="$(nproc)" 'BEGIN {
  w = w1 - w0; other = (m - o) / hz; if (other < 0) other = 0
  printf "measuring took %.0f s; other processes used %.1f CPU-s meanwhile (%.0f%% of the %d cores)\n", w, other, 100 * other / (w * n), n }'
echo
printf '%-5s %3s %14s %17s %18s %14s %15s  %s\n' op C "sandkeep ops/s" "redis noAOF ops/s" "redis always ops/s" "sk/redis-noAOF" "sk/redis-always" target
for C in 50 1; do
  for op in get set incr; do
    sk=$(val "sandkeep|$op|$C"); na=$(val "noaof|$op|$C"); al=$(val "always|$op|$C")
    r1=$(ratio "$sk" "$na"); r2=$(ratio "$sk" "$al")
    target=""
    if [ "$C" = 50 ] && [ "$op" = get ]; then target=$(verdict "$r1" 0.5 "GET >= 0.5x noAOF")
    elif [ "$C" = 50 ] && [ "$op" = set ]; then target=$(verdict "$r2" 1.0 "SET >= 1.0x always")
    fi
    for side in $SIDES; do
      [ -z "${ERR[$side|$op|$C]:-}" ] || target+=" [$side had ERRORS]"
    done
    printf '%-5s %3s %14s %17s %18s %14s %15s  %s\n' "${op^^}" "$C" "$(fmt_ops "$sk")" "$(fmt_ops "$na")" \
      "$(fmt_ops "$al")" "$r1" "$r2" "$target"
  done
done
echo
echo "latency p50/p99 in us; CPU us per op of the server / of its load generator (kvload or redis-benchmark)"
printf '%-5s %3s %18s %16s %16s %17s %18s %19s\n' op C "sandkeep p50/p99" "noAOF p50/p99" "always p50/p99" \
  "sk cpu srv/cli" "noAOF cpu srv/cli" "always cpu srv/cli"
for C in 50 1; do
  for op in get set incr; do
    cells=()
    for side in $SIDES; do cells+=("$(lat_of "$side|$op|$C")"); done
    for side in $SIDES; do
      k="$side|$op|$C"
      cells+=("$(median <<<"${CPU_SRV[$k]:-}")/$(median <<<"${CPU_CLI[$k]:-}")")
    done
    printf '%-5s %3s %18s %16s %16s %17s %18s %19s\n' "${op^^}" "$C" "${cells[@]}"
  done
done
if [ "$NERR" -gt 0 ]; then
  echo
  echo "ERRORS (these cells are not valid measurements):"
  for k in "${!ERR[@]}"; do echo "  $k: ${ERR[$k]}"; done
  exit 1
fi
