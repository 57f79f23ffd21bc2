#!/usr/bin/env bash
# The footprint as shipped (issue 23), in one run, as a table.
#
# Builds thingsly-agent the way the Yocto recipe does (cargo --release with the recipe's exported
# CARGO_PROFILE_RELEASE_* settings, then stripped as OE's do_package strips), for x86_64 here and
# for aarch64 through scripts/recipe-build.py (Rust 1.91, the vendored crates of crates.inc, at
# SRCREV). Then, in network namespaces it creates (hub: the bridge with its userspace WireGuard
# hub, DDI server and CA, Mosquitto with mTLS, InfluxDB; one namespace per device, each joined
# to the hub by a veth pair), for RUN_SECONDS (default 600) after 60 s of settling:
#   agent-all     every module on and working: telemetry and metrics every 10 s, OTA polling the
#                 DDI server (every 60 s) with a real `rauc service` on a private D-Bus, the
#                 terminal listening on its tunnel address, the tunnel up (keepalive 25 s)
#   agent-tunnel  only the tunnel (enrolled, everything else off)
#   agent-enroll  enrolled, every module off (the agent's floor)
#   wireguard-go  Debian's wireguard-go with the same hub as its peer, the key and address an
#                 enrollment gave it, keepalive 25 s (what the agent's tunnel replaces)
#   ttyd          ttyd listening, idle (TTYD_BIN, default `ttyd` on PATH; Debian has no ttyd
#                 package: build 1.7.7 from its source; the row says so when absent)
#   sleep         a bare process (the floor of any process)
#   agent-a64     agent-all's configuration, run by the aarch64 binary the recipe builds, under
#                 qemu-aarch64 (qemu-user): the guest's resident pages, counted as below
#   calib-x86, calib-a64  the counting's check: one C program (touches 4 MiB, then sleeps),
#                 native on x86_64 and for aarch64 under qemu-aarch64; the two RSS must agree
# and prints, per process: RSS and PSS (smaps_rollup), the RSS that is file-backed, CPU seconds
# per hour over the window, and the size of the executable as shipped; then where agent-all's
# resident pages are (smaps by mapping), and how many MQTT messages agent-all published in the
# window against the number of telemetry intervals in it.
#
# A guest's memory under qemu-user: qemu is started with a fixed guest base (-B) and a reserved
# guest address space (-R), so every page the guest maps lies in [base, base + size) of qemu's
# own address space and nothing of qemu's (its code, heap, translation buffer) does; the guest's
# RSS and PSS are the sums over qemu's smaps entries inside that range. File pages come from the
# same files (the executable, the aarch64 libc) through the same page cache and fault-around as
# a native process. CPU time under emulation says nothing about a board and is not given.
#
# Needs root (namespaces, TUN). Everything started is stopped and the namespaces removed on exit.
#   RUN_SECONDS=600 scripts/bench-footprint.sh        SKIP_AARCH64=1 to leave out the recipe build
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN_SECONDS:-600}
SETTLE=${SETTLE_SECONDS:-60}
TTYD=${TTYD_BIN:-$(command -v ttyd || true)}
scripts/install-deps.sh
ROOT=$(pwd)

# --- the agent as shipped ------------------------------------------------------------------
recipe_env=()
while read -r name value; do recipe_env+=("$name=$value"); done < <(
  sed -n 's/^export \(CARGO_PROFILE_[A-Z0-9_]*\) = "\([^"]*\)"$/\1 \2/p' \
    yocto-layer/meta-thingsly/recipes-thingsly/include/thingsly-rust.inc \
    yocto-layer/meta-thingsly/recipes-thingsly/thingsly-agent/thingsly-agent_0.1.0.bb)
echo "recipe profile: ${recipe_env[*]}" >&2
env "${recipe_env[@]}" cargo build -q --locked --release -p thingsly-agent --target-dir target/footprint
SHIPPED=$ROOT/target/footprint/thingsly-agent.shipped
strip --remove-section=.comment --remove-section=.note -o "$SHIPPED" target/footprint/release/thingsly-agent
cargo build -q --locked --release -p thingsly-bridge
BRIDGE=$ROOT/target/release/thingsly-bridge
A64_SIZE="not built (SKIP_AARCH64=1)"
if [[ -z ${SKIP_AARCH64:-} ]]; then
  scripts/install-toolchains.sh >/dev/null
  python3 scripts/recipe-build.py --only thingsly-agent >&2
  A64_SIZE=$(stat -c %s target/recipe-build/thingsly-agent.stripped | awk '{printf "%.2f MB", $1/1e6}')
fi

# --- namespaces and services ----------------------------------------------------------------
W=$(mktemp -d /tmp/thingsly-footprint.XXXXXX); chmod 755 "$W"
tag=fp$$
HUB=$tag-hub
pids=(); netns=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  tests/rauc/rauc-sandbox.sh --dir "$W/rauc" stop >/dev/null 2>&1 || true
  for n in "${netns[@]}"; do ip netns del "$n" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
nsx() { local n=$1; shift; ip netns exec "$n" "$@"; }
ip netns add "$HUB"; netns+=("$HUB"); nsx "$HUB" ip link set lo up
# device namespace N: veth 192.0.2.(4N+1) on the hub side, 192.0.2.(4N+2) on the device's.
device_ns() {
  local name=$tag-$1 n=$2
  ip netns add "$name"; netns+=("$name"); nsx "$name" ip link set lo up
  ip link add "$tag$n" netns "$HUB" type veth peer name eth0 netns "$name"
  nsx "$HUB" ip addr add "192.0.2.$((4 * n + 1))/30" dev "$tag$n"; nsx "$HUB" ip link set "$tag$n" up
  nsx "$name" ip addr add "192.0.2.$((4 * n + 2))/30" dev eth0; nsx "$name" ip link set eth0 up
  nsx "$name" ip route add default via "192.0.2.$((4 * n + 1))"
}
device_ns all 0; device_ns tun 1; device_ns wgo 2
[[ -z ${SKIP_AARCH64:-} ]] && device_ns a64 3
HUB_IP=192.0.2.1 # the hub side of the first pair; every device routes to it

mkdir -p "$W/influx"
printf 'reporting-disabled = true\nbind-address = "127.0.0.1:8088"\n[meta]\n dir = "%s/influx/meta"\n[data]\n dir = "%s/influx/data"\n wal-dir = "%s/influx/wal"\n query-log-enabled = false\n[monitor]\n store-enabled = false\n[http]\n bind-address = ":8086"\n log-enabled = false\n' "$W" "$W" "$W" > "$W/influx.conf"
ip netns exec "$HUB" influxd run -config "$W/influx.conf" >/dev/null 2>&1 & pids+=($!)
cat > "$W/bridge.toml" <<EOF
data_dir = "$W/bridge"
listen = "0.0.0.0:8443"
server_names = ["$HUB_IP"]
[wireguard]
mode = "userspace"
endpoint = "$HUB_IP:51820"
persistent_keepalive = 25
[ddi]
polling_sleep = "60s"
EOF
"$BRIDGE" --config "$W/bridge.toml" init >/dev/null
"$BRIDGE" --config "$W/bridge.toml" issue-server-cert --name "$HUB_IP" --out-cert "$W/m.crt" --out-key "$W/m.key" >/dev/null
cp "$W/bridge/ca/chain.pem" "$W/ca.pem"; chmod 644 "$W/m.crt" "$W/m.key" "$W/ca.pem"
tls_listener() { printf 'cafile %s/ca.pem\ncertfile %s/m.crt\nkeyfile %s/m.key\nrequire_certificate true\nuse_identity_as_username true\n' "$W" "$W" "$W"; }
# 8884: agent-a64's, under its own mount point, so that what agent-all publishes is counted alone.
{ printf 'persistence false\nallow_anonymous false\nlistener 8883 0.0.0.0\n'; tls_listener
  printf 'listener 8884 0.0.0.0\nmount_point a64/\n'; tls_listener; } > "$W/m.conf"
ip netns exec "$HUB" /usr/sbin/mosquitto -c "$W/m.conf" >/dev/null 2>&1 & pids+=($!)
ip netns exec "$HUB" "$BRIDGE" --config "$W/bridge.toml" serve >"$W/bridge.log" 2>&1 & pids+=($!)
eval "$(RAUC_SANDBOX_DIR="$W/rauc" tests/rauc/rauc-sandbox.sh start)"
for _ in $(seq 50); do nsx "$HUB" bash -c "exec 3<>/dev/tcp/127.0.0.1/8443" 2>/dev/null && break; sleep 0.2; done

# agent_config NAME MODULES... : every module off except those named
agent_config() {
  local name=$1; shift
  local on=" $* "
  has() { [[ $on == *" $1 "* ]] && echo true || echo false; }
  cat > "$W/$name.toml" <<EOF
[device]
id = "$name"
sw_version = "1.0.0"
state_dir = "$W/$name"
runtime_dir = "$W/$name-run"
[enroll]
server_url = "https://$HUB_IP:8443"
ca_bundle = "$W/ca.pem"
bootstrap_token_file = "$W/bridge/fleet-token"
[telemetry]
enabled = $(has telemetry)
host = "$HUB_IP"
port = 8883
[metrics]
enabled = $(has metrics)
[metrics.influxdb]
url = "http://$HUB_IP:8086"
[tunnel]
enabled = $(has tunnel)
[terminal]
enabled = $(has terminal)
user = "thingsly-terminal"
[rauc]
enabled = $(has rauc)
[ota]
enabled = $(has ota)
server_url = "https://$HUB_IP:8443"
health_deadline = "5m"
EOF
}
agent_config agent-all telemetry metrics tunnel terminal rauc ota
agent_config agent-tunnel tunnel
agent_config agent-enroll
agent_config wgo tunnel # enrolled for its WireGuard key and address, then run by wireguard-go
agent_config counter   # its certificate lets mosquitto_sub count what agent-all publishes
agent_config agent-a64 telemetry metrics tunnel terminal rauc ota
sed -i 's/^port = 8883$/port = 8884/' "$W/agent-a64.toml"

start() { # NS NAME ARGV... -> sets LAST_PID
  local ns=$1 name=$2; shift 2
  ip netns exec "$ns" "$@" >"$W/$name.log" 2>&1 & LAST_PID=$!; pids+=("$LAST_PID")
}
nsx "$tag-wgo" "$SHIPPED" --config "$W/wgo.toml" enroll >/dev/null
nsx "$tag-all" "$SHIPPED" --config "$W/counter.toml" enroll >/dev/null
declare -A pid
start "$tag-all" agent-all env RUST_LOG=warn "DBUS_SYSTEM_BUS_ADDRESS=$DBUS_SYSTEM_BUS_ADDRESS" "$SHIPPED" --config "$W/agent-all.toml" run; pid[agent-all]=$LAST_PID
start "$tag-tun" agent-tunnel env RUST_LOG=warn "$SHIPPED" --config "$W/agent-tunnel.toml" run; pid[agent-tunnel]=$LAST_PID
start "$tag-all" agent-enroll env RUST_LOG=warn "$SHIPPED" --config "$W/agent-enroll.toml" run; pid[agent-enroll]=$LAST_PID
# wireguard-go with the enrolled identity: the same hub, the same keepalive.
wg_json=$W/wgo/tunnel/wireguard.json
wgval() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$wg_json" "$1"; }
wgval private_key > "$W/wgo.key"; chmod 600 "$W/wgo.key"
start "$tag-wgo" wireguard-go env WG_PROCESS_FOREGROUND=1 wireguard-go wgo0; pid[wireguard-go]=$LAST_PID
for _ in $(seq 50); do nsx "$tag-wgo" ip link show wgo0 >/dev/null 2>&1 && break; sleep 0.1; done
nsx "$tag-wgo" wg set wgo0 private-key "$W/wgo.key" peer "$(wgval peer_public_key)" endpoint "$(wgval endpoint)" \
  allowed-ips 10.8.0.0/24 persistent-keepalive 25
nsx "$tag-wgo" ip addr add "$(wgval address)" dev wgo0; nsx "$tag-wgo" ip link set wgo0 up
if [[ -n $TTYD ]]; then
  start "$tag-all" ttyd "$TTYD" -p 7690 -i lo /bin/sh; pid[ttyd]=$LAST_PID
fi
start "$tag-all" sleep sleep infinity; pid[sleep]=$LAST_PID
GUEST_BASE=0x2000000000 GUEST_SIZE=0x100000000 # 4 GiB of guest address space from 128 GiB up
# An aarch64 program under qemu-user, every guest page inside [GUEST_BASE, + GUEST_SIZE).
QEMU_A64=(qemu-aarch64 -B "$GUEST_BASE" -R "$GUEST_SIZE" -L /usr/aarch64-linux-gnu)
A64_BIN=$ROOT/target/recipe-build/thingsly-agent.stripped
if [[ -z ${SKIP_AARCH64:-} ]]; then
  start "$tag-a64" agent-a64 env RUST_LOG=warn "DBUS_SYSTEM_BUS_ADDRESS=$DBUS_SYSTEM_BUS_ADDRESS" \
    "${QEMU_A64[@]}" "$A64_BIN" --config "$W/agent-a64.toml" run
  pid[agent-a64]=$LAST_PID
fi
# (qemu-x86_64 cannot check the counting with our x86_64 binary: an x86_64 guest needs the
# vsyscall page at the top of the address space, outside any -R range.)
printf '#include <stdlib.h>\n#include <string.h>\n#include <unistd.h>\nint main(void) { char *p = malloc(4 << 20); memset(p, 1, 4 << 20); pause(); return p[0]; }\n' > "$W/calib.c"
gcc -O2 -o "$W/calib-x86" "$W/calib.c"
aarch64-linux-gnu-gcc -O2 -o "$W/calib-a64" "$W/calib.c"
start "$tag-all" calib-x86 "$W/calib-x86"; pid[calib-x86]=$LAST_PID
start "$tag-all" calib-a64 "${QEMU_A64[@]}" "$W/calib-a64"; pid[calib-a64]=$LAST_PID
ip netns exec "$HUB" mosquitto_sub -h "$HUB_IP" -p 8883 --cafile "$W/ca.pem" --cert "$W/counter/identity/device.crt" \
  --key "$W/counter/identity/device.key" -t 'v1/devices/me/#' -F '%U %t' >"$W/mqtt.log" 2>&1 & pids+=($!)

sleep "$SETTLE"
tick=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Context switches of all the process's threads: how often it wakes up, whatever the CPU. Under
# qemu-user the guest's sleeps are qemu's host syscalls, so this counts for the emulated agents
# too (plus qemu's own RCU thread, a few per hour).
wakeups() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s + 0}'; }
declare -A cpu0 wake0
for n in "${!pid[@]}"; do
  if ! kill -0 "${pid[$n]}" 2>/dev/null; then
    echo "$n exited before the window; its log:" >&2; tail -n 20 "$W/$n.log" >&2 || true
    cpu0[$n]=0; wake0[$n]=0; continue
  fi
  cpu0[$n]=$(cpu "${pid[$n]}"); wake0[$n]=$(wakeups "${pid[$n]}")
done
t0=$(date +%s.%N)
sleep "$RUN"
t1=$(date +%s.%N)

# --- report ---------------------------------------------------------------------------------
kib() { awk -v k="$1" 'BEGIN {printf "%.1f MiB", k/1024}'; }
rollup() { awk -v f="$2" '$1 == f":" {print $2}' "/proc/$1/smaps_rollup"; }
guest_rollup() { # PID FIELD: FIELD (kB) summed over qemu's mappings inside the guest's range
  python3 - "$1" "$2" "$GUEST_BASE" "$GUEST_SIZE" <<'PY'
import re, sys
pid, field, base, size = sys.argv[1], sys.argv[2], int(sys.argv[3], 16), int(sys.argv[4], 16)
total, inside = 0, False
for line in open(f"/proc/{pid}/smaps"):
    m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
    if m:
        inside = base <= int(m[1], 16) and int(m[2], 16) <= base + size
    elif inside and line.startswith(field + ":"):
        total += int(line.split()[1])
print(total)
PY
}
exe_size() { # the executable, as shipped for ours; ttyd with its shared libraries
  case $1 in
    agent-*) stat -c %s "$SHIPPED" | awk '{printf "%.2f MB", $1/1e6}' ;;
    ttyd) local libs; libs=$(ldd "$TTYD" | awk '/=>/ {print $3}' | xargs stat -Lc %s | awk '{s+=$1} END {printf "%.1f", s/1e6}')
          stat -c %s "$TTYD" | awk -v l="$libs" '{printf "%.2f MB + %s MB shared libraries", $1/1e6, l}' ;;
    wireguard-go) stat -c %s "$(command -v wireguard-go)" | awk '{printf "%.2f MB", $1/1e6}' ;;
    *) echo "" ;;
  esac
}
echo
echo "x86_64, ${RUN} s after ${SETTLE} s of settling, in one run:"
echo
echo "| process | RSS | PSS | of the RSS file-backed | CPU s/h | wakeups/h | executable as shipped |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for n in agent-all agent-tunnel agent-enroll wireguard-go ttyd sleep agent-a64 calib-x86 calib-a64; do
  [[ -n ${pid[$n]:-} ]] || { echo "| $n | not run ($( [[ $n == ttyd ]] && echo 'no ttyd binary: TTYD_BIN' || echo SKIP_AARCH64)) | | | | | |"; continue; }
  p=${pid[$n]}
  if ! kill -0 "$p" 2>/dev/null; then echo "| $n | exited (see its log) | | | | | |"; continue; fi
  wph=$(awk -v w="$(( $(wakeups "$p") - ${wake0[$n]} ))" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", w / (b - a) * 3600}')
  if [[ $n == *-a64 ]]; then
    rss=$(guest_rollup "$p" Rss); pss=$(guest_rollup "$p" Pss); anon=$(guest_rollup "$p" Anonymous)
    size=$([[ $n == agent-a64 ]] && echo "$A64_SIZE" || echo "")
    echo "| $n (guest pages under qemu-user) | $(kib "$rss") | $(kib "$pss") | $(kib $((rss - anon))) | emulated | $wph | $size |"
    continue
  fi
  rss=$(rollup "$p" Rss); pss=$(rollup "$p" Pss); anon=$(rollup "$p" Anonymous)
  used=$(( $(cpu "$p") - ${cpu0[$n]} ))
  cph=$(awk -v c="$used" -v t="$tick" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", c / t / (b - a) * 3600}')
  echo "| $n | $(kib "$rss") | $(kib "$pss") | $(kib $((rss - anon))) | $cph | $wph | $(exe_size "$n") |"
done
echo
echo "aarch64 (scripts/recipe-build.py: the recipe's build with Rust 1.91, stripped as OE strips): $A64_SIZE"
echo
echo "agent-all's resident pages by mapping (smaps):"
echo
echo "| mapping | RSS |"
echo "| --- | --- |"
awk '/^[0-9a-f]+-[0-9a-f]+ / {name = ($6 == "" ? "[anonymous]" : $6); sub(".*/", "", name)}
     /^Rss:/ {rss[name] += $2}
     END {for (n in rss) if (rss[n] > 0) printf "%d %s\n", rss[n], n}' "/proc/${pid[agent-all]}/smaps" |
  sort -rn | head -8 | while read -r k n; do echo "| $n | $(kib "$k") |"; done
echo
in0=$(awk -v a="$t0" -v b="$t1" '$1 >= a && $1 < b' "$W/mqtt.log" | wc -l)
tel=$(awk -v a="$t0" -v b="$t1" '$1 >= a && $1 < b && $2 ~ /telemetry$/' "$W/mqtt.log" | wc -l)
echo "agent-all published $in0 MQTT messages in the ${RUN} s window ($tel telemetry, $((in0 - tel)) other) at one telemetry interval per 10 s: $((RUN / 10)) intervals"
up=$("$SHIPPED" --config "$W/agent-all.toml" status --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["state"]["tunnel_state"], s["state"]["modules"]["ota"]["state"], s["state"]["modules"]["terminal"]["state"], s["state"]["modules"]["metrics"]["state"], s["state"]["modules"]["telemetry"]["state"])' 2>/dev/null || echo "status unreadable")
for n in agent-a64; do
  [[ -n ${pid[$n]:-} ]] || continue
  echo "$n at the end: tunnel, ota, terminal, metrics, telemetry = $("$SHIPPED" --config "$W/$n.toml" status --json | python3 -c 'import json,sys; s=json.load(sys.stdin)["state"]; m=s["modules"]; print(s["tunnel_state"], *(m[k]["state"] for k in ("ota", "terminal", "metrics", "telemetry")))' 2>/dev/null || echo "status unreadable")"
done
echo "agent-all at the end: tunnel, ota, terminal, metrics, telemetry = $up; wireguard-go: $(nsx "$tag-wgo" wg show wgo0 latest-handshakes | awk '{print ($2 > 0) ? "handshake done" : "no handshake"}')"
