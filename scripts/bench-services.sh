# Sourced by the bench scripts: starts thingsly-bridge (fresh PKI), Mosquitto with mTLS and
# InfluxDB on free loopback ports in a scratch dir $W, and defines `agent` to run an agent
# against them. Everything started is stopped (and $W removed) on exit.
# Needs: BRIDGE_BIN (path of thingsly-bridge).
W=$(mktemp -d); chmod 755 "$W"
pids=(); cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
BP=$(port); MP=$(port); IP=$(port); IRPC=$(port)
mkdir -p "$W/influx"
printf 'reporting-disabled = true\nreporting-enabled = false\nbind-address = "127.0.0.1:%s"\n[meta]\n dir = "%s/influx/meta"\n[data]\n dir = "%s/influx/data"\n wal-dir = "%s/influx/wal"\n query-log-enabled = false\n[monitor]\n store-enabled = false\n[http]\n bind-address = "127.0.0.1:%s"\n log-enabled = false\n[ifql]\n enabled = false\n' "$IRPC" "$W" "$W" "$W" "$IP" > "$W/influx/influxdb.conf"
influxd run -config "$W/influx/influxdb.conf" >/dev/null 2>&1 & pids+=($!)
printf 'data_dir = "%s/bridge"\nlisten = "127.0.0.1:%s"\n[wireguard]\nmode = "off"\n' "$W" "$BP" > "$W/bridge.toml"
"$BRIDGE_BIN" --config "$W/bridge.toml" init >/dev/null
"$BRIDGE_BIN" --config "$W/bridge.toml" issue-server-cert --name 127.0.0.1 --out-cert "$W/m.crt" --out-key "$W/m.key" >/dev/null
cp "$W/bridge/ca/chain.pem" "$W/ca.pem"; chmod 644 "$W/m.crt" "$W/m.key" "$W/ca.pem"
printf 'persistence false\nallow_anonymous false\nlistener %s 127.0.0.1\ncafile %s/ca.pem\ncertfile %s/m.crt\nkeyfile %s/m.key\nrequire_certificate true\nuse_identity_as_username true\n' "$MP" "$W" "$W" "$W" > "$W/m.conf"
/usr/sbin/mosquitto -c "$W/m.conf" >/dev/null 2>&1 & pids+=($!)
"$BRIDGE_BIN" --config "$W/bridge.toml" serve >/dev/null 2>&1 & pids+=($!)
sleep 1

# agent NAME TELEMETRY(true|false) METRICS(true|false) [RUNNER...] BINARY -> sets LAST_PID
agent() {
  local name=$1 tel=$2 met=$3; shift 3
  printf '[device]\nid = "%s"\nstate_dir = "%s/%s"\nruntime_dir = "%s/%s-run"\n[enroll]\nserver_url = "https://127.0.0.1:%s"\nca_bundle = "%s/ca.pem"\nbootstrap_token_file = "%s/bridge/fleet-token"\n[telemetry]\nenabled = %s\nhost = "127.0.0.1"\nport = %s\n[metrics]\nenabled = %s\n[metrics.influxdb]\nurl = "http://127.0.0.1:%s"\n[rauc]\nenabled = false\n[tunnel]\nenabled = false\n' \
    "$name" "$W" "$name" "$W" "$name" "$BP" "$W" "$W" "$tel" "$MP" "$met" "$IP" > "$W/$name.toml"
  RUST_LOG=warn "$@" --config "$W/$name.toml" run >/dev/null 2>&1 & LAST_PID=$!; pids+=("$LAST_PID")
}
