#!/usr/bin/env bash
# Rust toolchains and targets the tests build with: stable (default), the MSRV (the oldest Rust
# the Yocto layer supports, read from Cargo.toml), and the board targets. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
msrv=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
have() { rustup "$@" 2>/dev/null; }
if ! rustup toolchain list | grep -q "^$msrv-"; then rustup toolchain install "$msrv" --profile minimal >&2; fi
targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl)
installed=$(rustup target list --installed)
for t in "${targets[@]}"; do grep -qx "$t" <<<"$installed" || rustup target add "$t" >&2; done
# The recipe-build check (scripts/recipe-build.py) builds for the board with the MSRV.
rustup target list --toolchain "$msrv" --installed | grep -qx aarch64-unknown-linux-gnu \
  || rustup target add --toolchain "$msrv" aarch64-unknown-linux-gnu >&2
have component list --installed | grep -q '^clippy' || rustup component add clippy rustfmt >&2
echo "$msrv"
