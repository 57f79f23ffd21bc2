#!/usr/bin/env bash
# Cross-builds the workspace for the boards (aarch64 and armv7, glibc) and runs every unit test
# there under qemu-user; builds the static aarch64-musl agent and checks that it starts.
# The end-to-end tests (real services) stay native: they run in scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/install-toolchains.sh >/dev/null
pkgs=(-p thingsly-core -p thingsly-proto -p thingsly-enroll -p thingsly-telemetry -p thingsly-metrics -p thingsly-terminal -p thingsly-tunnel -p thingsly-ota -p thingsly-bridge -p thingsly-agent)
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
  echo "== $t: build and unit tests under $(grep -A2 "^\[target.$t\]" .cargo/config.toml | sed -n 's/^runner = "\([^ ]*\).*/\1/p')" >&2
  cargo test --locked --target "$t" "${pkgs[@]}"
done
echo "== aarch64-unknown-linux-musl: static agent" >&2
cargo build --locked --target aarch64-unknown-linux-musl -p thingsly-agent
bin=target/aarch64-unknown-linux-musl/debug/thingsly-agent
file "$bin" | grep -q 'statically linked' || { echo "$bin is not static" >&2; exit 1; }
qemu-aarch64 "$bin" --version
