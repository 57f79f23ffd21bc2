#!/usr/bin/env bash
# Runs the whole seed loop on this machine with embedded defaults and tells it as a story:
# enrolled, tunnel up, telemetry, metrics, update 1.0.0 -> 2.0.0 into slot B, a terminal
# session through the bridge's proxy, then `thingsly-agent status`. Two network namespaces it
# makes (a "cloud" one: thingsly-bridge with its userspace WireGuard hub, DDI server and
# terminal proxy, an operators' identity provider, Mosquitto with mTLS, InfluxDB; a "device"
# one: thingsly-agent on a real `rauc service` sandbox), joined by a veth pair: nothing leaves
# the machine. The terminal proxy is forwarded to 127.0.0.1:$OPERATOR_PORT.
#   DURATION=120 scripts/run-local.sh    # stop by itself 120 s after the start (0: until Ctrl-C)
# Ctrl-C (or the end of DURATION) stops what it started and removes its namespaces.
# State and logs: $THINGSLY_LOCAL (default ./.local-run). Needs root (namespaces, TUN).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BASE=${THINGSLY_LOCAL:-$ROOT/.local-run}
DURATION=${DURATION:-0}
OPERATOR_PORT=${OPERATOR_PORT:-8444}
if [[ $(id -u) -ne 0 ]]; then
  echo "run-local: needs root (it makes network namespaces and TUN interfaces): sudo $0" >&2
  exit 1
fi
scripts/install-deps.sh
# Only what the story runs (the test and bench drivers are not needed).
cargo build --release --locked -q -p thingsly-agent -p thingsly-bridge -p thingsly-e2e \
  --bin thingsly-agent --bin thingsly-bridge --bin thingsly-local
exec "$ROOT/target/release/thingsly-local" --dir "$BASE" --duration "$DURATION" --operator-port "$OPERATOR_PORT"
