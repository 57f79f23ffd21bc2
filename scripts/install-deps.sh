#!/usr/bin/env bash
# Installs the Debian packages the local run and the tests need (idempotent, quiet when done).
set -euo pipefail
# rauc and friends are for the RAUC test (tests/rauc/rauc-sandbox.sh): installed here, not mid-test.
# influxdb (1.6, influxd) and curl for the metrics tests; iproute2 for their network namespaces.
pkgs=(mosquitto mosquitto-clients openssl systemd rauc rauc-service squashfs-tools dbus dbus-bin libglib2.0-bin influxdb influxdb-client curl iproute2)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  SUDO=; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
