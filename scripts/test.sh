#!/usr/bin/env bash
# Runs every test on a fresh Debian machine: installs what the tests need (Debian packages),
# checks formatting and lints, builds the binaries the end-to-end tests start, runs unit and
# end-to-end tests (real thingsly-bridge, Mosquitto with mTLS, InfluxDB, thingsly-agent; root is
# needed for tmpfs mounts and network namespaces), builds every agent feature set the recipe offers,
# lints the Yocto layer and builds its recipes as bitbake would (with the MSRV toolchain), checks
# the systemd units, cross-builds for the boards with their unit tests under qemu-user, and runs
# the QEMU hardware-in-the-loop update and rollback (hil/run.sh ci).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
# One build per run: incremental caches only cost disk here (CI has little of it).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
scripts/install-deps.sh
scripts/install-toolchains.sh >/dev/null
if grep -q '^name = "aws-lc' Cargo.lock; then echo "aws-lc found in Cargo.lock: ring is the only crypto provider" >&2; exit 1; fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Every module can be compiled out: the smallest agent must build cleanly too.
cargo clippy -p thingsly-agent --no-default-features --locked -- -D warnings
cargo build --workspace --bins --locked
cargo test --workspace --locked
# Each PACKAGECONFIG combination the recipe offers alone, and none.
for features in "" telemetry metrics terminal tunnel rauc ota; do
  cargo build -q --locked -p thingsly-agent --no-default-features --features "$features"
done
# Those builds leave a one-feature agent in target/debug; the end-to-end tests run that path,
# so put the full agent back for anyone running `cargo test` after this script.
cargo build -q --locked --bins
scripts/lint-layer.sh
# The recipes build the tree at SRCREV: it must have their features, units and Cargo.lock.
scripts/check-srcrev.sh
# What bitbake would do with the recipes: crates from crates.io checked against crates.inc,
# vendored, built --frozen --offline for aarch64 with the layer's Rust (the MSRV), licenses.
scripts/recipe-build.py --debug-build
scripts/check-units.sh
scripts/test-cross.sh
# QEMU hardware-in-the-loop: A/B update and rollback with the release agent, the arm64 board.
hil/run.sh ci
echo "target/ holds $(du -sh target | cut -f1); $(df -h --output=avail . | tail -n1 | tr -d ' ') free" >&2
echo "all checks passed in $(( $(date +%s) - start )) s"
