#!/bin/bash
# boot.sh - run the HIL disk in QEMU (x86_64, q35, OVMF) and wait for serial-console markers.
#
#   boot.sh start RUN [--disk IMG] [--fresh] [--accel kvm|tcg] [--mem MIB] [--smp N]
#                     [--fwd GUESTPORT:HOSTPORT]... [--reboot cold|warm]
#       Start QEMU in the background under a small supervisor. --reboot cold (default): QEMU
#       runs with -no-reboot and the supervisor starts it again after every guest reboot
#       (a power cycle; "HIL-HOST: power-on N" lines in serial.log); warm: QEMU resets in place.
#       State lives in the directory RUN:
#         disk.qcow2 (with --fresh: a new overlay on IMG, IMG itself is never written)
#         OVMF_VARS.fd, serial.log (everything the guest printed), serial.sock
#         (interactive console: socat -,raw,echo=0 UNIX-CONNECT:RUN/serial.sock),
#         monitor.sock (HMP), qemu.pid, start.ts, serial.ts.log (serial lines with host time)
#       --accel default: kvm if /dev/kvm works with this CPU (vmx/svm flag), else tcg.
#       Network: user-mode (slirp) with restrict=on, so the guest reaches nothing but
#       10.0.2.100:GUESTPORT -> host 127.0.0.1:HOSTPORT for each --fwd (guestfwd, one socat
#       per connection).
#   boot.sh wait RUN REGEX [TIMEOUT_S] [NTH]
#       Wait until serial.log has NTH (default 1) lines matching the extended regex; prints
#       that line and the seconds since start. Exit 1 on timeout or if the VM is gone.
#   boot.sh mon RUN CMD...   send an HMP command (e.g. system_reset, "info status")
#   boot.sh stop RUN         quit QEMU (monitor "quit", then the saved PIDs only)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
OVMF_CODE=${HIL_OVMF_CODE:-/usr/share/OVMF/OVMF_CODE_4M.fd}
OVMF_VARS=${HIL_OVMF_VARS:-/usr/share/OVMF/OVMF_VARS_4M.fd}
die() { echo "boot.sh: $*" >&2; exit 1; }
now() { date +%s.%N; }

kvm_usable() {
	# /dev/kvm alone is not enough: here it is backed by kvm_pvm (no vmx/svm), which runs
	# only PVM-aware guest kernels; OVMF and stock kernels fail under it.
	[ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo
}

cmd=${1:-}; RUN=${2:-}
[ -n "$cmd" ] && [ -n "$RUN" ] || die "usage: boot.sh start|wait|mon|stop RUN ..."
shift 2

mon() { echo "$*" | socat -t 2 - "UNIX-CONNECT:$RUN/monitor.sock" 2>/dev/null | tr -d '\r' | grep -v '^(qemu)' || true; }
alive() { [ -f "$RUN/supervisor.pid" ] && kill -0 "$(cat "$RUN/supervisor.pid")" 2>/dev/null; }

case "$cmd" in
start)
	DISK=${HIL_OUT:-$HERE/../target/hil/out}/disk.img
	FRESH=0 ACCEL= MEM=512 SMP=2 REBOOT=cold
	NET=user,id=n0,restrict=on
	while [ $# -gt 0 ]; do
		case "$1" in
		--disk) DISK=$2; shift ;;
		--fresh) FRESH=1 ;;
		--accel) ACCEL=$2; shift ;;
		--mem) MEM=$2; shift ;;
		--smp) SMP=$2; shift ;;
		--fwd) NET="$NET,guestfwd=tcp:10.0.2.100:${2%%:*}-cmd:socat STDIO TCP:127.0.0.1:${2#*:}"; shift ;;
		--reboot) REBOOT=$2; shift ;;
		*) die "start: unknown option $1" ;;
		esac
		shift
	done
	[ -n "$ACCEL" ] || { if kvm_usable; then ACCEL=kvm; else ACCEL=tcg; fi; }
	case "$REBOOT" in cold | warm) ;; *) die "--reboot cold|warm" ;; esac
	mkdir -p "$RUN"
	alive && die "already running (supervisor pid $(cat "$RUN/supervisor.pid"))"
	if [ "$FRESH" = 1 ] || [ ! -f "$RUN/disk.qcow2" ]; then
		rm -f "$RUN/disk.qcow2"
		qemu-img create -q -f qcow2 -b "$(readlink -f "$DISK")" -F raw "$RUN/disk.qcow2"
		cp "$OVMF_VARS" "$RUN/OVMF_VARS.fd"
	fi
	rm -f "$RUN/serial.log" "$RUN/serial.ts.log" "$RUN/serial.sock" "$RUN/monitor.sock" "$RUN/stop" "$RUN/qemu.pid"
	: >"$RUN/serial.log"
	now >"$RUN/start.ts"
	echo "$ACCEL" >"$RUN/accel"
	qemu=(qemu-system-x86_64 -name hil -nodefaults -no-user-config
		-machine q35 -accel "$ACCEL" -m "$MEM" -smp "$SMP"
		-drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE"
		-drive "if=pflash,format=raw,unit=1,file=$RUN/OVMF_VARS.fd"
		-drive "if=none,id=hd0,format=qcow2,file=$RUN/disk.qcow2,discard=unmap"
		-device virtio-blk-pci,drive=hd0,bootindex=0
		-netdev "$NET"
		-device virtio-net-pci,netdev=n0,romfile=
		-device virtio-rng-pci
		-chardev "socket,id=ser0,path=$RUN/serial.sock,server=on,wait=off,logfile=$RUN/serial.log,logappend=on"
		-serial chardev:ser0
		-monitor "unix:$RUN/monitor.sock,server=on,wait=off"
		-display none -vga none
		-pidfile "$RUN/qemu.pid")
	# cold (default): -no-reboot, and this supervisor powers the VM on again after each guest
	# reboot (a fresh QEMU on the same disk + NVRAM). Warm resets inside one QEMU made OVMF
	# under TCG slow (10-60 s) or hang for good after "reboot: machine restart".
	[ "$REBOOT" = cold ] && qemu+=(-no-reboot)
	(
		n=0
		while :; do
			n=$((n + 1))
			echo "HIL-HOST: power-on $n at $(now)" >>"$RUN/serial.log"
			"${qemu[@]}" 2>>"$RUN/qemu.stderr"
			rc=$?
			echo "HIL-HOST: qemu exited rc=$rc at $(now)" >>"$RUN/serial.log"
			[ "$REBOOT" = cold ] && [ $rc = 0 ] && [ ! -e "$RUN/stop" ] || break
			# the guest powered off (not rebooted): stay off
			tail -c 300 "$RUN/serial.log" | grep -q 'reboot: Power down' && break
		done
		rm -f "$RUN/qemu.pid"
	) </dev/null >/dev/null 2>&1 &
	sup=$!
	echo $sup >"$RUN/supervisor.pid"
	# serial.ts.log: every serial line prefixed with the host's time (for phase timings);
	# the follower ends by itself when the supervisor exits (tail --pid)
	(tail -n +1 -F --pid="$sup" "$RUN/serial.log" 2>/dev/null |
		while IFS= read -r l; do printf '%s %s\n' "$EPOCHREALTIME" "${l%$'\r'}"; done >"$RUN/serial.ts.log") &
	for _ in $(seq 50); do [ -s "$RUN/qemu.pid" ] && break; sleep 0.1; done
	[ -s "$RUN/qemu.pid" ] || { cat "$RUN/qemu.stderr" >&2; die "qemu failed to start"; }
	echo "boot.sh: started qemu pid $(cat "$RUN/qemu.pid") (supervisor $sup) accel=$ACCEL reboot=$REBOOT run=$RUN" >&2
	;;
wait)
	re=${1:?regex}; timeout=${2:-300}; nth=${3:-1}
	t0=$(now); start=$(cat "$RUN/start.ts")
	while :; do
		if [ -f "$RUN/serial.log" ] && line=$(tr -d '\r' <"$RUN/serial.log" | grep -aE -m"$nth" -- "$re" | sed -n "${nth}p") && [ -n "$line" ]; then
			t=$(now)
			printf '%s\t[+%.1fs since start, waited %.1fs]\n' "$line" "$(echo "$t - $start" | bc)" "$(echo "$t - $t0" | bc)"
			exit 0
		fi
		alive || die "qemu is not running (waiting for /$re/)"
		[ "$(echo "$(now) - $t0 > $timeout" | bc)" = 1 ] && die "timeout after ${timeout}s waiting for /$re/"
		sleep 0.2
	done
	;;
mon)
	mon "$@"
	;;
stop)
	: >"$RUN/stop"
	if alive; then
		sup=$(cat "$RUN/supervisor.pid")
		mon quit >/dev/null
		for _ in $(seq 50); do kill -0 "$sup" 2>/dev/null || break; sleep 0.1; done
		if kill -0 "$sup" 2>/dev/null; then
			[ -s "$RUN/qemu.pid" ] && kill "$(cat "$RUN/qemu.pid")" 2>/dev/null
			sleep 0.5
			kill "$sup" 2>/dev/null || true
		fi
	fi
	rm -f "$RUN/supervisor.pid"
	;;
*) die "unknown command $cmd" ;;
esac
