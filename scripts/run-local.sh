#!/usr/bin/env bash
# Runs the whole loop on this machine with embedded defaults: thingsly-bridge (initialised PKI),
# Mosquitto with mutual TLS trusting the bridge's CA, InfluxDB 1.x for the metrics, and
# thingsly-agent enrolling, publishing telemetry and writing Telegraf-compatible metrics.
# Everything listens on 127.0.0.1; state lives in $THINGSLY_LOCAL (default ./.local-run).
# Ctrl-C stops what this script started (and only that).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BASE=${THINGSLY_LOCAL:-$ROOT/.local-run}
BRIDGE_PORT=${BRIDGE_PORT:-8443}
MQTT_PORT=${MQTT_PORT:-8883}
INFLUX_PORT=${INFLUX_PORT:-8086}
INFLUX_RPC_PORT=${INFLUX_RPC_PORT:-8088}
DURATION=${DURATION:-0}   # seconds to run before stopping; 0 = until Ctrl-C

scripts/install-deps.sh
cargo build --release --bins -q
BIN=$ROOT/target/release

rm -rf "$BASE"; mkdir -p "$BASE"; chmod 755 "$BASE"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

cat > "$BASE/bridge.toml" <<TOML
data_dir = "$BASE/bridge"
listen = "127.0.0.1:$BRIDGE_PORT"
# The WireGuard hub and the device tunnel would put tunnel addresses (10.8.0.x) on this
# machine's own network; they run in network namespaces in tests/tests/tunnel.rs instead.
[wireguard]
mode = "off"
TOML
"$BIN/thingsly-bridge" --config "$BASE/bridge.toml" init
"$BIN/thingsly-bridge" --config "$BASE/bridge.toml" issue-server-cert --name localhost --name 127.0.0.1 \
  --out-cert "$BASE/mqtt/server.crt" --out-key "$BASE/mqtt/server.key"
cp "$BASE/bridge/ca/chain.pem" "$BASE/mqtt/ca.pem"
chmod 755 "$BASE/mqtt"; chmod 644 "$BASE/mqtt/"*   # mosquitto drops root to its own user
cat > "$BASE/mqtt/mosquitto.conf" <<CONF
per_listener_settings false
persistence false
allow_anonymous false
log_dest stdout
connection_messages true
listener $MQTT_PORT 127.0.0.1
cafile $BASE/mqtt/ca.pem
certfile $BASE/mqtt/server.crt
keyfile $BASE/mqtt/server.key
require_certificate true
use_identity_as_username true
CONF
/usr/sbin/mosquitto -c "$BASE/mqtt/mosquitto.conf" > "$BASE/mosquitto.log" 2>&1 & pids+=($!)
"$BIN/thingsly-bridge" --config "$BASE/bridge.toml" serve > "$BASE/bridge.log" 2>&1 & pids+=($!)

mkdir -p "$BASE/influxdb"
cat > "$BASE/influxdb/influxdb.conf" <<CONF
reporting-disabled = true
reporting-enabled = false
bind-address = "127.0.0.1:$INFLUX_RPC_PORT"
[meta]
  dir = "$BASE/influxdb/meta"
[data]
  dir = "$BASE/influxdb/data"
  wal-dir = "$BASE/influxdb/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:$INFLUX_PORT"
  log-enabled = false
[ifql]
  enabled = false
CONF
influxd run -config "$BASE/influxdb/influxdb.conf" > "$BASE/influxdb.log" 2>&1 & pids+=($!)

cat > "$BASE/agent.toml" <<TOML
[device]
id = "device-0001"
state_dir = "$BASE/agent-state"
runtime_dir = "$BASE/agent-run"
[enroll]
server_url = "https://127.0.0.1:$BRIDGE_PORT"
ca_bundle = "$BASE/bridge/ca/chain.pem"
bootstrap_token_file = "$BASE/bridge/fleet-token"
[telemetry]
host = "127.0.0.1"
port = $MQTT_PORT
[metrics.influxdb]
url = "http://127.0.0.1:$INFLUX_PORT"
[tunnel]
enabled = false
TOML
sleep 0.5
"$BIN/thingsly-agent" --config "$BASE/agent.toml" run > "$BASE/agent.log" 2>&1 & pids+=($!)

# Show what reaches the broker, as a ThingsBoard server would see it.
"$BIN/thingsly-bridge" --config "$BASE/bridge.toml" issue-client-cert --cn observer \
  --out-cert "$BASE/observer.crt" --out-key "$BASE/observer.key"
echo "bridge https://127.0.0.1:$BRIDGE_PORT, broker mqtts://127.0.0.1:$MQTT_PORT, InfluxDB http://127.0.0.1:$INFLUX_PORT (db telegraf), state in $BASE"
echo "messages the agent publishes (Ctrl-C to stop):"
timeout_args=()
[[ $DURATION -gt 0 ]] && timeout_args=(-W "$DURATION")
mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" --cafile "$BASE/mqtt/ca.pem" --cert "$BASE/observer.crt" \
  --key "$BASE/observer.key" -t 'v1/devices/me/#' -v "${timeout_args[@]}" || true
echo; "$BIN/thingsly-agent" --config "$BASE/agent.toml" status
echo; echo "metrics in InfluxDB (measurement: points):"
for m in cpu mem disk diskio net system agent; do
  n=$(curl -sS -G "http://127.0.0.1:$INFLUX_PORT/query" --data-urlencode db=telegraf \
    --data-urlencode "q=SELECT count(*) FROM $m" | grep -o '"values":\[\[[^]]*' | cut -d, -f2 || true)
  echo "  $m: ${n:-0}"
done
