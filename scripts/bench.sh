#!/usr/bin/env bash
# Prints a table: agent RSS and CPU per hour (telemetry every 10 s, metrics every 10 s to a real
# InfluxDB, vs both off, same run), binary sizes (dist profile stripped vs release), bridge
# enrollments per second vs a baseline, metrics cycle cost vs reading the same files, wire bytes.
# SECONDS_PER_RUN (default 120) sets how long each agent is measured. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${SECONDS_PER_RUN:-120}
scripts/install-deps.sh
cargo build --release --bins -q
cargo build --profile dist -p thingsly-agent -q
B=$(pwd)/target/release
W=$(mktemp -d); chmod 755 "$W"
pids=(); cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
BP=$(port); MP=$(port); IP=$(port); IRPC=$(port)
mkdir -p "$W/influx"
printf 'reporting-disabled = true\nreporting-enabled = false\nbind-address = "127.0.0.1:%s"\n[meta]\n dir = "%s/influx/meta"\n[data]\n dir = "%s/influx/data"\n wal-dir = "%s/influx/wal"\n query-log-enabled = false\n[monitor]\n store-enabled = false\n[http]\n bind-address = "127.0.0.1:%s"\n log-enabled = false\n[ifql]\n enabled = false\n' "$IRPC" "$W" "$W" "$W" "$IP" > "$W/influx/influxdb.conf"
influxd run -config "$W/influx/influxdb.conf" >/dev/null 2>&1 & pids+=($!)
printf 'data_dir = "%s/bridge"\nlisten = "127.0.0.1:%s"\n' "$W" "$BP" > "$W/bridge.toml"
"$B/thingsly-bridge" --config "$W/bridge.toml" init >/dev/null
"$B/thingsly-bridge" --config "$W/bridge.toml" issue-server-cert --name 127.0.0.1 --out-cert "$W/m.crt" --out-key "$W/m.key"
cp "$W/bridge/ca/chain.pem" "$W/ca.pem"; chmod 644 "$W/m.crt" "$W/m.key" "$W/ca.pem"
printf 'persistence false\nallow_anonymous false\nlistener %s 127.0.0.1\ncafile %s/ca.pem\ncertfile %s/m.crt\nkeyfile %s/m.key\nrequire_certificate true\nuse_identity_as_username true\n' "$MP" "$W" "$W" "$W" > "$W/m.conf"
/usr/sbin/mosquitto -c "$W/m.conf" >/dev/null 2>&1 & pids+=($!)
"$B/thingsly-bridge" --config "$W/bridge.toml" serve 2>/dev/null & pids+=($!)
sleep 1
agent() { # name telemetry_enabled metrics_enabled -> sets LAST_PID
  printf '[device]\nid = "%s"\nstate_dir = "%s/%s"\nruntime_dir = "%s/%s-run"\n[enroll]\nserver_url = "https://127.0.0.1:%s"\nca_bundle = "%s/ca.pem"\nbootstrap_token_file = "%s/bridge/fleet-token"\n[telemetry]\nenabled = %s\nhost = "127.0.0.1"\nport = %s\n[metrics]\nenabled = %s\n[metrics.influxdb]\nurl = "http://127.0.0.1:%s"\n[rauc]\nenabled = false\n' \
    "$1" "$W" "$1" "$W" "$1" "$BP" "$W" "$W" "$2" "$MP" "$3" "$IP" > "$W/$1.toml"
  RUST_LOG=warn "$B/thingsly-agent" --config "$W/$1.toml" run >/dev/null 2>&1 & LAST_PID=$!; pids+=("$LAST_PID")
}
agent bench-tel true false; A1=$LAST_PID
agent bench-off false false; A2=$LAST_PID
agent bench-met false true; A3=$LAST_PID
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
