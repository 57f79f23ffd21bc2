#!/usr/bin/env bash
# Prints a table: agent RSS and CPU per hour (telemetry every 10 s, metrics every 10 s to a real
# InfluxDB, vs both off, same run), binary sizes (dist profile stripped vs release), bridge
# enrollments per second vs a baseline, metrics cycle cost vs reading the same files, wire bytes,
# terminal throughput and echo latency (bare PTY, device direct, through the bridge's proxy),
# WireGuard tunnel TCP/ping vs the bare veth, hub CPU per 100 Mbit/s, agent RSS tunnel up vs off.
# SECONDS_PER_RUN (default 120) sets how long each agent is measured. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${SECONDS_PER_RUN:-120}
scripts/install-deps.sh
cargo build --release --bins -q
cargo build --profile dist -p thingsly-agent -q
B=$(pwd)/target/release
BRIDGE_BIN=$B/thingsly-bridge
# shellcheck source=scripts/bench-services.sh
source scripts/bench-services.sh
agent bench-tel true false "$B/thingsly-agent"; A1=$LAST_PID
agent bench-off false false "$B/thingsly-agent"; A2=$LAST_PID
agent bench-met false true "$B/thingsly-agent"; A3=$LAST_PID
sleep "$RUN"
tick=$(getconf CLK_TCK)
measure() { # pid -> "rss_kib cpu_s_per_hour"
  local rss; rss=$(awk '/VmRSS/ {print $2}' /proc/$1/status)
  local cpu; cpu=$(awk -v t="$tick" '{print ($14+$15)/t}' /proc/$1/stat)
  local up; up=$(awk -v t="$tick" -v b="$(awk '{print $1}' /proc/uptime)" '{print b - $22/t}' /proc/$1/stat)
  awk -v r="$rss" -v c="$cpu" -v u="$up" 'BEGIN {printf "%.1f MiB, %.2f s", r/1024, c/u*3600}'
}
echo "| what | value |"
echo "| --- | --- |"
echo "| agent, enrolled + telemetry every 10 s: RSS, CPU per hour (${RUN} s run) | $(measure "$A1") |"
echo "| agent, enrolled, metrics every 10 s to InfluxDB, telemetry off: RSS, CPU per hour | $(measure "$A3") |"
echo "| agent, enrolled, telemetry and metrics off (baseline): RSS, CPU per hour | $(measure "$A2") |"
points=$(curl -sS -G "http://127.0.0.1:$IP/query" --data-urlencode db=telegraf --data-urlencode "q=SELECT count(uptime) FROM system WHERE host = 'bench-met'" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["results"][0]["series"][0]["values"][0][1])' 2>/dev/null || echo 0)
echo "| metrics collections that reached InfluxDB during the ${RUN} s run | ${points} |"
cp target/release/thingsly-agent "$W/strip-me"; strip "$W/strip-me"
echo "| thingsly-agent x86_64, --release (unstripped / stripped) | $(stat -c %s target/release/thingsly-agent | awk '{printf "%.2f MB", $1/1e6}') / $(stat -c %s "$W/strip-me" | awk '{printf "%.2f MB", $1/1e6}') |"
echo "| thingsly-agent x86_64, --profile dist (opt s, LTO, stripped) | $(stat -c %s target/dist/thingsly-agent | awk '{printf "%.2f MB", $1/1e6}') |"
cargo build -p thingsly-e2e --release --bin thingsly-bench -q
target/release/thingsly-bench metrics 2000
target/release/thingsly-bench enroll "https://127.0.0.1:$BP" "$W/ca.pem" "$(cat "$W/bridge/fleet-token")" "$(cat "$W/bridge/admin-token")" 200 8
target/release/thingsly-bench terminal 64
target/release/thingsly-bench connections 10000
target/release/thingsly-bench tunnel 10
target/release/thingsly-bench ota 1024
