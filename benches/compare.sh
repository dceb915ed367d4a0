#!/usr/bin/env bash
# The relay against nginx `proxy_pass` under the same wrk load (issue: "a durable relay that
# keeps pace with a plain forwarder"). Both forward the 8x8 call status sample (a distinct
# eventId per request) to the same sink (`hookrelay sink`, output discarded); the relay also
# stores, deduplicates and routes each event durably (redb). After an uncounted warm-up of
# each, runs them BENCH_ROUNDS times (default 3), which goes first alternating by round, for
# BENCH_SECONDS each (default 10) with BENCH_CONNS connections (default 64) and prints each
# run (with the CPU time per request of the relay process and of nginx's processes, the
# bytes they wrote to disk, and the events fully relayed per second: for the relay, over the
# load and the delivery of its backlog), the medians, the ratios, and each round's ratio with
# their median, and how quick the disk was before each round (the relay's figures move with
# it). A non-2xx answer or a socket error fails the bench.
# BENCH_PERF=file first records a CPU profile of the relay (perf, call graphs) in a round of
# its own, not counted. Installs Debian's nginx and wrk when missing. Everything listens on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${BENCH_ROUNDS:-3}
seconds=${BENCH_SECONDS:-10}
conns=${BENCH_CONNS:-64}

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

# HOOKRELAY_BIN: a given build instead (to compare two builds, run this once with each).
if [ -n "${HOOKRELAY_BIN:-}" ]; then
  bin=$HOOKRELAY_BIN
else
  cargo build --release --bin hookrelay -q
  bin=$PWD/target/release/hookrelay
fi
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

sink_port=$(free_port); nginx_port=$(free_port); relay_port=$(free_port); admin_port=$(free_port)
"$bin" sink --listen "127.0.0.1:$sink_port" > /dev/null 2>&1 & pids+=($!)
wait_port "$sink_port"

cat > "$work/nginx.conf" <<CONF
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream sink { server 127.0.0.1:$sink_port; keepalive 128; }
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
      proxy_pass http://sink;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
"$nginx_bin" -c "$work/nginx.conf" -p "$work"
wait_port "$nginx_port"

cat > "$work/routes.toml" <<CONF
[server]
listen = "127.0.0.1:$relay_port"
admin_listen = "127.0.0.1:$admin_port"
[store]
path = "$work/data"
[delivery]
max_in_flight = 64
max_queue = 10000000
rate = { per_second = 10000000, burst = 100000 }
[[sources]]
name = "voice"
path = "/in"
event_id = ["\$.payload.eventId"]
[[destinations]]
name = "sink"
url = "http://127.0.0.1:$sink_port/"
[[routes]]
name = "all"
source = "voice"
to = ["sink"]
CONF
HOOKRELAY_LOG=warn "$bin" serve --config "$work/routes.toml" > /dev/null 2>&1 & pids+=($!)
relay_pid=$!
wait_port "$relay_port"
nginx_pids="$(cat "$work/nginx.pid") $(pgrep -P "$(cat "$work/nginx.pid")" | tr '\n' ' ')"

# A distinct eventId per request, shaped as 8x8's are: a version-1 UUID whose timestamp runs
# up, as a relay that has run for days sees them (see event_id in benches/support/load.rs):
# its low 32 bits, which a v1 UUID begins with, land at random because the timestamp steps by
# a Weyl stride. The wrk thread is in the clock sequence, the round in the node.
sed 's/eb0fc709-9693-11ea-454d-1705dde98182/%s/' examples/payloads/8x8/voice-call-status.json > "$work/template.json"
cat > "$work/post.lua" <<'LUA'
local template = io.open(os.getenv("TEMPLATE")):read("*a")
-- "r2" (relay, round 2) becomes the node 0x720002.
local round = os.getenv("ROUND")
local node = round:byte(1) * 0x10000 + tonumber(round:sub(2))
local threads = 0
function setup(thread) thread:set("tid", threads); threads = threads + 1 end
-- The timestamp less its top 12 bits (time_mid, time_low: exact in a double), from a day in
-- 2024, each round later than the one before (2^50 ticks: more than a round's steps take);
-- what carries past 48 bits goes into time_hi.
local t = 0x133a * 0x100000000 + tonumber(round:sub(2)) * 0x4000000000000
request = function()
  t = t + 0x9e3779b9
  local id = string.format("%08x-%04x-1%03x-%04x-%012x", t % 0x100000000,
    math.floor(t / 0x100000000) % 0x10000, 0x1ef + math.floor(t / 0x1000000000000),
    0x8000 + tid, node)
  local body = string.format(template, id)
  return wrk.format("POST", "/in", { ["Content-Type"] = "application/json" }, body)
end
LUA

# CPU time (user + system, in clock ticks) of the processes $@.
ticks() { for p in "$@"; do awk '{print $14 + $15}' "/proc/$p/stat"; done | awk '{t += $1} END {print t}'; }

# Bytes the processes $@ have caused to be written to disk (`write_bytes`: the pages they
# dirtied, whether written by them or flushed later by the kernel).
written() { for p in "$@"; do awk '/^write_bytes/ {print $2}' "/proc/$p/io"; done | awk '{b += $1} END {printf "%.0f\n", b}'; }

# How quick the disk is now, the relay's figures move with it (its commit ends in an
# fdatasync, and this machine's disk is shared): µs per 4 KiB write with O_DSYNC, 200 of them.
disk_probe() {
  dd if=/dev/zero of="$work/disk-probe" bs=4k count=200 oflag=dsync 2>&1 |
    awk '/copied/ {for (i = 1; i <= NF; i++) if ($i == "s,") printf "%.0f", $(i - 1) * 1e6 / 200}'
  rm -f "$work/disk-probe"
}

# µs of CPU per request: ticks spent, requests.
per_request() { awk -v t="$1" -v r="$2" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", t * 1e6 / hz / r}'; }

# wrk's Requests/sec, its 99th percentile in ms, its non-2xx count and its request count.
# A run with a non-2xx answer or a socket error (a timeout too: wrk leaves those out of its
# latencies) fails the bench: its rate would count requests that were not accepted.
run() { # name port round [seconds]
  local out
  out=$(TEMPLATE="$work/template.json" ROUND="$3" wrk -t2 -c"$conns" -d"${4:-$seconds}s" --latency -s "$work/post.lua" "http://127.0.0.1:$2/in")
  local rps p99 bad reqs errors
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' <<<"$out")
  bad=$(awk '/Non-2xx/ {print $5}' <<<"$out"); bad=${bad:-0}
  errors=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' <<<"$out"); errors=${errors:-0}
  if [ "$bad" != 0 ] || [ "$errors" != 0 ]; then
    echo "$1 round $3: $bad non-2xx answers, $errors socket errors; wrk said:" >&2
    echo "$out" >&2
    return 1
  fi
  echo "$1 $rps $p99 $bad $reqs"
}

# Waits until the relay has delivered its backlog (bounded: 120 s). A depth it cannot read
# fails the bench rather than ending the wait.
drain() {
  for _ in $(seq 1 1200); do
    depth=$(curl -s "http://127.0.0.1:$admin_port/metrics" | awk '/^hookrelay_queue_depth\{destination="sink"\}/ {print $2}' || true)
    case "$depth" in
      0) return 0 ;;
      ''|*[!0-9]*) echo "the relay's queue depth could not be read (got '$depth')" >&2; return 1 ;;
    esac
    sleep 0.1
  done
  echo "the relay did not deliver its backlog within 120 s" >&2
  return 1
}

now() { date +%s.%N; }

if [ -n "${BENCH_PERF:-}" ]; then
  # A CPU profile of the relay under the load, in a round of its own that no figure counts
  # (perf slows what it records): 5 s from 2 s into the round.
  (sleep 2; exec perf record -q -F 499 --call-graph dwarf -o "$BENCH_PERF" -p "$relay_pid" -- sleep 5) > /dev/null 2>&1 &
  perf_pid=$!; pids+=("$perf_pid")
  run relay "$relay_port" r0 > /dev/null
  wait "$perf_pid" || { echo "perf record failed" >&2; exit 1; }
  drain
  echo "profile of the relay: $BENCH_PERF"
fi

# Both warm up first (connections, caches, the relay's store file), in a run no figure counts.
run nginx "$nginx_port" w0 2 > /dev/null
run relay "$relay_port" w0 2 > /dev/null
drain

echo "| round | system | req/s | p99 ms | non-2xx | CPU µs/request | disk bytes/request | fully relayed/s |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
declare -a nginx_rps relay_rps relay_full nginx_p99 relay_p99 nginx_cpu relay_cpu relay_disk disk_us
nginx_round() {
  # The forwarder's own CPU (nginx's processes, the relay's process), not the sink's or wrk's.
  # shellcheck disable=SC2086
  before=$(ticks $nginx_pids)
  # shellcheck disable=SC2086
  wrote=$(written $nginx_pids)
  read -r _ rps p99 bad reqs < <(run nginx "$nginx_port" "n$r") || exit 1
  # shellcheck disable=SC2086
  cpu=$(per_request $(($(ticks $nginx_pids) - before)) "$reqs")
  # shellcheck disable=SC2086
  disk=$((($(written $nginx_pids) - wrote) / reqs))
  nginx_rps+=("$rps"); nginx_p99+=("$p99"); nginx_cpu+=("$cpu")
  # nginx answers only once the sink has answered: what it accepts, it has relayed.
  echo "| $r | nginx proxy_pass | $rps | $p99 | $bad | $cpu | $disk | $rps |"
}
relay_round() {
  before=$(ticks "$relay_pid")
  wrote=$(written "$relay_pid")
  t0=$(now)
  read -r _ rps p99 bad reqs < <(run relay "$relay_port" "r$r") || exit 1
  # Its CPU counts until its backlog is delivered, so each accepted event's delivery is in
  # the figure; so does the time for "fully relayed".
  drain
  full=$(awk -v n="$reqs" -v a="$t0" -v b="$(now)" 'BEGIN {printf "%.2f", n / (b - a)}')
  cpu=$(per_request $(($(ticks "$relay_pid") - before)) "$reqs")
  disk=$((($(written "$relay_pid") - wrote) / reqs))
  relay_rps+=("$rps"); relay_full+=("$full"); relay_p99+=("$p99"); relay_cpu+=("$cpu"); relay_disk+=("$disk")
  echo "| $r | hookrelay (redb, durable) | $rps | $p99 | $bad | $cpu | $disk | $full |"
}
for r in $(seq 1 "$rounds"); do
  disk_us+=("$(disk_probe)")
  # Which goes first alternates, so a machine that drifts within a round favours neither.
  if [ $((r % 2)) = 1 ]; then nginx_round; relay_round; else relay_round; nginx_round; fi
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
n=$(median "${nginx_rps[@]}"); h=$(median "${relay_rps[@]}")
echo
echo "median req/s: nginx $n, hookrelay $h; hookrelay / nginx = $(awk -v a="$h" -v b="$n" 'BEGIN {printf "%.2f", a/b}')"
f=$(median "${relay_full[@]}")
echo "median fully relayed/s: nginx $n, hookrelay $f; hookrelay / nginx = $(awk -v a="$f" -v b="$n" 'BEGIN {printf "%.2f", a/b}')"
echo "median p99 ms: nginx $(median "${nginx_p99[@]}"), hookrelay $(median "${relay_p99[@]}")"
nc=$(median "${nginx_cpu[@]}"); hc=$(median "${relay_cpu[@]}")
echo "median CPU µs/request: nginx $nc, hookrelay $hc; hookrelay / nginx = $(awk -v a="$hc" -v b="$nc" 'BEGIN {printf "%.2f", a/b}')"
echo "median disk bytes/request, hookrelay: $(median "${relay_disk[@]}")"
# The machine's speed drifts between rounds (a shared VM): each round's ratio compares runs
# seconds apart, so their median is the steadier figure.
ratios=()
for i in "${!relay_rps[@]}"; do
  ratios+=("$(awk -v a="${relay_rps[$i]}" -v b="${nginx_rps[$i]}" 'BEGIN {printf "%.2f", a/b}')")
done
echo "hookrelay / nginx req/s by round: ${ratios[*]}; median $(median "${ratios[@]}")"
echo "disk by round (µs per 4 KiB O_DSYNC write, 200 of them): ${disk_us[*]}"
