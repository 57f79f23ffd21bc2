#!/usr/bin/env bash
# Runs every test on a fresh Debian machine: installs what the tests need (Debian packages),
# checks formatting and lints, builds the binaries the end-to-end tests start, runs unit and
# end-to-end tests (real thingsly-bridge, Mosquitto with mTLS, thingsly-agent; root is needed
# for the full-disk test's tmpfs), and checks the systemd units.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
scripts/install-deps.sh
if grep -q '^name = "aws-lc' Cargo.lock; then echo "aws-lc found in Cargo.lock: ring is the only crypto provider" >&2; exit 1; fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Every module can be compiled out: the smallest agent must build cleanly too.
cargo clippy -p thingsly-agent --no-default-features --locked -- -D warnings
cargo build --workspace --bins --locked
cargo test --workspace --locked
scripts/check-units.sh
echo "all checks passed in $(( $(date +%s) - start )) s"
