#!/usr/bin/env bash
# Cross-builds the workspace for the boards (glibc) and runs every unit test there under
# qemu-user; builds the static aarch64-musl release agent (the one the HIL arm64 board boots)
# and checks that it starts. The end-to-end tests (real services) stay native: scripts/test.sh.
#   scripts/test-cross.sh [TARGET...]   (default: aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/install-toolchains.sh >/dev/null
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
pkgs=(-p thingsly-core -p thingsly-proto -p thingsly-enroll -p thingsly-telemetry -p thingsly-metrics -p thingsly-terminal -p thingsly-tunnel -p thingsly-ota -p thingsly-bridge -p thingsly-agent)
for t in "${targets[@]}"; do
  grep -q "^\[target.$t\]" .cargo/config.toml || { echo "no [target.$t] (linker, qemu runner) in .cargo/config.toml" >&2; exit 2; }
  echo "== $t: build and unit tests under $(grep -A2 "^\[target.$t\]" .cargo/config.toml | sed -n 's/^runner = "\([^ ]*\).*/\1/p')" >&2
  cargo test --locked --target "$t" "${pkgs[@]}"
done
# Release, not debug, in hil/run.sh's directory: the arm64 board boots this very binary, so
# CI builds it once (scripts/test.sh starts it early, in THINGSLY_RELEASE_DIR).
rel=${THINGSLY_RELEASE_DIR:-target}
echo "== aarch64-unknown-linux-musl: static release agent" >&2
cargo build --locked --release --target-dir "$rel" --target aarch64-unknown-linux-musl -p thingsly-agent
bin=$rel/aarch64-unknown-linux-musl/release/thingsly-agent
file "$bin" | grep -q 'statically linked' || { echo "$bin is not static" >&2; exit 1; }
qemu-aarch64 "$bin" --version
