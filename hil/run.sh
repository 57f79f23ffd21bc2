#!/usr/bin/env bash
# Hardware-in-the-loop in one command: builds the agent (release; x86_64 for the A/B image,
# aarch64-musl for the arm64 board), the bridge and the runner, the image (Debian packages
# cached in ~/.cache/thingsly-hil), then runs the scenarios and prints a table.
#   hil/run.sh [update|rollback|health|powercut|arm64|ci|all]...   (default: all)
#   hil/run.sh bench                                              (boot and update phase times)
#   hil/run.sh streaming | download|stream|adaptive|adaptive-fallback|stream-cuts|stream-powercut|stream-cap
#                                    (on the trixie image, HIL_SUITE=trixie; about 25 min)
# ci = update rollback arm64 (what scripts/test.sh runs). Needs root (image build, QEMU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
args=("$@"); [ ${#args[@]} -gt 0 ] || args=(all)
# The release agents' target directory: scripts/test.sh builds them beforehand in its own
# (target/release-agents), overlapping the end-to-end tests without waiting on target/'s lock.
rel=${THINGSLY_RELEASE_DIR:-target}
cargo build --locked --release --target-dir "$rel" -p thingsly-agent
cargo build --locked --bins
if [[ " ${args[*]} " =~ \ (arm64|ci|all)\  ]]; then
  scripts/install-toolchains.sh >/dev/null
  cargo build --locked --release --target-dir "$rel" --target aarch64-unknown-linux-musl -p thingsly-agent
  export HIL_ARM64_AGENT=$rel/aarch64-unknown-linux-musl/release/thingsly-agent
fi
stream=0 other=0
for a in "${args[@]}"; do
  case "$a" in
  streaming|download|stream|adaptive|adaptive-fallback|stream-cuts|stream-powercut|stream-cap) stream=1 ;;
  *) other=1 ;;
  esac
done
if ((other)); then
  HIL_AGENT_BIN=$rel/release/thingsly-agent HIL_BRIDGE_BIN=target/debug/thingsly-bridge hil/build-image.sh
fi
# The streaming scenarios run on the trixie image (RAUC with NBD streaming).
if ((stream)); then
  HIL_SUITE=trixie HIL_AGENT_BIN=$rel/release/thingsly-agent HIL_BRIDGE_BIN=target/debug/thingsly-bridge hil/build-image.sh
fi
exec target/debug/thingsly-hil "${args[@]}"
