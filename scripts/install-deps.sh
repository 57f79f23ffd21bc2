#!/usr/bin/env bash
# Installs the Debian packages the local run and the tests need (idempotent, quiet when done).
set -euo pipefail
# rauc and friends are for the RAUC test (tests/rauc/rauc-sandbox.sh): installed here, not mid-test.
# influxdb (1.6, influxd) and curl for the metrics tests; iproute2 for their network namespaces.
# Cross gcc + qemu-user for the board targets (scripts/test-cross.sh); python3-venv for oelint-adv.
# chromium for the terminal page test (tests/browser, driven by playwright-core from npm);
# wireguard-go + wireguard-tools as the independent WireGuard peer, iperf3 for the tunnel bench.
# tinyproxy as the corporate HTTP proxy (Basic auth) of the proxy test (tests/tests/http_proxy.rs).
# swupdate (its suricatta hawkBit client) and cpio (to pack its .swu) for the DDI conformance
# test; that test runs its own swupdate with a private $TMPDIR, whatever the package's unit does.
pkgs=(swupdate cpio tinyproxy chromium wireguard-go wireguard-tools iperf3 iputils-ping mosquitto mosquitto-clients openssl systemd rauc rauc-service squashfs-tools dbus dbus-bin libglib2.0-bin influxdb influxdb-client curl iproute2
      gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user file python3-venv)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  SUDO=; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The browser test's npm packages (xterm.js, playwright-core) need Node.js >= 20 and npm; the
# machine's own Node.js is used (bookworm's nodejs is 18, too old for playwright-core).
if ! command -v npm >/dev/null || ! node -e 'process.exit(+process.versions.node.split(".")[0] < 20 ? 1 : 0)'; then
  echo "install-deps: Node.js >= 20 with npm is required (found: $(node --version 2>/dev/null || echo none))" >&2
  exit 1
fi
# The terminal's sessions run as this user (terminal.user's default), never as the agent's.
if ! getent passwd thingsly-terminal >/dev/null; then
  SUDO=; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO useradd --system --user-group --create-home --home-dir /home/thingsly-terminal --shell /bin/sh thingsly-terminal
fi
