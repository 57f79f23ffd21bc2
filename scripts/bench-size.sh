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
all="telemetry,metrics,terminal,tunnel,rauc"
echo "| what | value |"
echo "| --- | --- |"
for t in x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl; do
  b=$(dist "$t" "$all"); echo "| agent, $t, all modules ($all) | $(size "$b") |"
done
for f in "" telemetry metrics terminal tunnel rauc; do
  b=$(dist aarch64-unknown-linux-gnu "$f"); echo "| agent, aarch64-unknown-linux-gnu, features: ${f:-none (enroll only)} | $(size "$b") |"
done

# RSS with every module working: bridge (enrollment), Mosquitto (telemetry), InfluxDB (metrics).
cargo build -q --locked --release -p thingsly-bridge
BRIDGE_BIN=target/release/thingsly-bridge
# shellcheck source=scripts/bench-services.sh
source scripts/bench-services.sh
A64=target/size/aarch64-unknown-linux-gnu/$all/thingsly-agent
X86=target/size/x86_64-unknown-linux-gnu/$all/thingsly-agent
agent x86-on true true "$X86"; P1=$LAST_PID
agent arm-on true true qemu-aarch64 -L /usr/aarch64-linux-gnu "$A64"; P2=$LAST_PID
agent arm-off false false qemu-aarch64 -L /usr/aarch64-linux-gnu "$A64"; P3=$LAST_PID
sleep "$RUN"
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$1/status"; }
echo "| agent x86_64 (dist), all modules on, ${RUN} s: RSS | $(rss "$P1") |"
echo "| agent aarch64 (dist) under qemu-aarch64, all modules on: RSS of the qemu process | $(rss "$P2") |"
echo "| agent aarch64 (dist) under qemu-aarch64, telemetry and metrics off (same-run baseline) | $(rss "$P3") |"
