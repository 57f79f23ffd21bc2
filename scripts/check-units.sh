#!/usr/bin/env bash
# systemd-analyze verify + security (offline) on the units in a scratch root with stub
# binaries. Fails on any output verify prints and on an exposure above 2.5.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(mktemp -d); trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/etc/systemd/system" "$root/lib/systemd"
cp -r /lib/systemd/system "$root/lib/systemd/"
for b in thingsly-agent thingsly-bridge systemctl; do printf '#!/bin/sh\n' > "$root/usr/bin/$b"; chmod +x "$root/usr/bin/$b"; done
cp systemd/*.service systemd/*.path "$root/etc/systemd/system/"
# The reboot helper runs as root by design (it reboots): verified, not scored.
for u in thingsly-agent-reboot.path thingsly-agent-reboot.service; do
  out=$(systemd-analyze verify --root="$root" "$root/etc/systemd/system/$u" 2>&1 || true)
  if [[ -n $out ]]; then echo "verify $u:"; echo "$out"; exit 1; fi
done
fail=0
for u in thingsly-agent.service thingsly-bridge.service; do
  out=$(systemd-analyze verify --root="$root" "$root/etc/systemd/system/$u" 2>&1 | grep -v -e 'rauc.service' || true)
  if [[ -n $out ]]; then echo "verify $u:"; echo "$out"; fail=1; fi
  score=$(systemd-analyze security --offline=yes --root="$root" "$root/etc/systemd/system/$u" 2>/dev/null | grep -o 'Overall exposure level[^:]*: [0-9.]*' | grep -o '[0-9.]*$')
  echo "$u: exposure $score"
  awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.5) }' || { echo "$u: exposure $score > 2.5"; fail=1; }
done
exit $fail
