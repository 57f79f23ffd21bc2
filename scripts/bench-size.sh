#!/usr/bin/env bash
# Prints a table: stripped size of thingsly-agent with the size profile (`--profile dist`: opt-level
# s, fat LTO, 1 codegen unit, panic abort, strip) per target with all modules, and per feature set
# on aarch64; then the RSS of the aarch64 agent under qemu-user with all modules on against the
# same binary with them off and against x86_64, each running 60 s (RUN_SECONDS) against a local
# bridge, Mosquitto and InfluxDB started here. Anchor: a tokio + reqwest + zbus program is
# 2.50 MB stripped on aarch64 with the same profile.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN_SECONDS:-60}
scripts/install-deps.sh
scripts/install-toolchains.sh >/dev/null
size() { stat -c %s "$1" | awk '{printf "%.2f MB", $1/1e6}'; }
dist() { # target features -> path of the stripped binary
  local t=$1 f=$2 dir=target/size/${1}/${2:-none}
  cargo build -q --locked --profile dist -p thingsly-agent --target "$t" --no-default-features \
    --features "$f" --target-dir "target/size-build"
  mkdir -p "$dir"; cp "target/size-build/$t/dist/thingsly-agent" "$dir/"; echo "$dir/thingsly-agent"
}
all="telemetry,metrics,terminal,rauc"
echo "| what | value |"
echo "| --- | --- |"
for t in x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl; do
  b=$(dist "$t" "$all"); echo "| agent, $t, all modules ($all) | $(size "$b") |"
done
for f in "" telemetry metrics terminal rauc; do
  b=$(dist aarch64-unknown-linux-gnu "$f"); echo "| agent, aarch64-unknown-linux-gnu, features: ${f:-none (enroll only)} | $(size "$b") |"
done

# RSS with every module working: bridge (enrollment), Mosquitto (telemetry), InfluxDB (metrics).
cargo build -q --locked --release -p thingsly-bridge
W=$(mktemp -d); chmod 755 "$W"
pids=(); cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
BP=$(port); MP=$(port); IP=$(port); IRPC=$(port)
B=target/release/thingsly-bridge
printf 'data_dir = "%s/bridge"\nlisten = "127.0.0.1:%s"\n' "$W" "$BP" > "$W/bridge.toml"
"$B" --config "$W/bridge.toml" init >/dev/null
"$B" --config "$W/bridge.toml" issue-server-cert --name 127.0.0.1 --out-cert "$W/m.crt" --out-key "$W/m.key" >/dev/null
cp "$W/bridge/ca/chain.pem" "$W/ca.pem"; chmod 644 "$W/m.crt" "$W/m.key" "$W/ca.pem"
printf 'persistence false\nallow_anonymous false\nlistener %s 127.0.0.1\ncafile %s/ca.pem\ncertfile %s/m.crt\nkeyfile %s/m.key\nrequire_certificate true\nuse_identity_as_username true\n' "$MP" "$W" "$W" "$W" > "$W/m.conf"
/usr/sbin/mosquitto -c "$W/m.conf" >/dev/null 2>&1 & pids+=($!)
mkdir -p "$W/influx"
printf 'reporting-disabled = true\nreporting-enabled = false\nbind-address = "127.0.0.1:%s"\n[meta]\n dir = "%s/influx/meta"\n[data]\n dir = "%s/influx/data"\n wal-dir = "%s/influx/wal"\n[monitor]\n store-enabled = false\n[http]\n bind-address = "127.0.0.1:%s"\n log-enabled = false\n[ifql]\n enabled = false\n' "$IRPC" "$W" "$W" "$W" "$IP" > "$W/influx/influxdb.conf"
influxd run -config "$W/influx/influxdb.conf" >/dev/null 2>&1 & pids+=($!)
"$B" --config "$W/bridge.toml" serve >/dev/null 2>&1 & pids+=($!)
sleep 1
agent() { # name modules_on runner binary -> LAST_PID
  printf '[device]\nid = "%s"\nstate_dir = "%s/%s"\nruntime_dir = "%s/%s-run"\n[enroll]\nserver_url = "https://127.0.0.1:%s"\nca_bundle = "%s/ca.pem"\nbootstrap_token_file = "%s/bridge/fleet-token"\n[telemetry]\nenabled = %s\nhost = "127.0.0.1"\nport = %s\n[metrics]\nenabled = %s\n[metrics.influxdb]\nurl = "http://127.0.0.1:%s"\n[rauc]\nenabled = false\n' \
    "$1" "$W" "$1" "$W" "$1" "$BP" "$W" "$W" "$2" "$MP" "$2" "$IP" > "$W/$1.toml"
  RUST_LOG=warn $3 "$4" --config "$W/$1.toml" run >/dev/null 2>&1 & LAST_PID=$!; pids+=("$LAST_PID")
}
A64=target/size/aarch64-unknown-linux-gnu/$all/thingsly-agent
X86=target/size/x86_64-unknown-linux-gnu/$all/thingsly-agent
agent x86-on true "" "$X86"; P1=$LAST_PID
agent arm-on true "qemu-aarch64 -L /usr/aarch64-linux-gnu" "$A64"; P2=$LAST_PID
agent arm-off false "qemu-aarch64 -L /usr/aarch64-linux-gnu" "$A64"; P3=$LAST_PID
sleep "$RUN"
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$1/status"; }
echo "| agent x86_64 (dist), all modules on, ${RUN} s: RSS | $(rss "$P1") |"
echo "| agent aarch64 (dist) under qemu-aarch64, all modules on: RSS of the qemu process | $(rss "$P2") |"
echo "| agent aarch64 (dist) under qemu-aarch64, telemetry and metrics off (same-run baseline) | $(rss "$P3") |"
