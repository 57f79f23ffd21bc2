#!/bin/bash
# arm64-boot.sh - boot Debian's arm64 kernel on an emulated board (qemu-system-aarch64 -M virt,
# cortex-a57, TCG) with a busybox-static initramfs, run an aarch64 binary in it, power off.
# Everything comes from Debian packages (apt-get download + dpkg-deb -x, no chroot, no mount).
#
# Usage: arm64-boot.sh [--kernel generic|cloud] [--bin FILE]... [--file SRC:DST]... [--run CMD]...
#                      [--smp N] [--keep]
#   --bin FILE      copy a static aarch64 binary into the initramfs (as /bin/NAME) and run it
#   --file SRC:DST  copy a file into the initramfs at DST (e.g. the agent and its config)
#   --run CMD       run a shell command line in the VM (in order, after the --bin runs); each
#                   prints HIL-ARM64-RUN-OK: CMD or HIL-ARM64-RUN-FAILED: CMD rc=N
#   --keep          do not power off: leave a busybox shell on the serial console (interactive)
# Env: HIL_ARM64_OUT (this run's initramfs and serial.log; default target/hil/arm64),
#      HIL_ARM64_CACHE (Debian's kernel and busybox, kept between runs and clones;
#      default ~/.cache/thingsly-hil/arm64, beside the image build's .deb cache)
# Prints: time to "HIL-ARM64-INIT" (kernel up, /init running) and to QEMU exit after poweroff.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${HIL_ARM64_OUT:-$HERE/../target/hil/arm64}
CACHE=${HIL_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/thingsly-hil/arm64}
FLAVOUR=generic SMP=2 KEEP=0
BINS=() FILES=() RUNS=()
while [ $# -gt 0 ]; do
	case "$1" in
	--kernel) FLAVOUR=$2; shift ;;
	--bin) BINS+=("$(readlink -f "$2")"); shift ;;
	--file) FILES+=("$(readlink -f "${2%%:*}"):${2#*:}"); shift ;;
	--run) RUNS+=("$2"); shift ;;
	--smp) SMP=$2; shift ;;
	--keep) KEEP=1 ;;
	*) echo "usage: $0 [--kernel generic|cloud] [--bin FILE]... [--file SRC:DST]... [--run CMD]... [--smp N] [--keep]" >&2; exit 2 ;;
	esac
	shift
done
log() { echo "arm64-boot: $*" >&2; }
mkdir -p "$OUT" "$CACHE"
OUT=$(cd "$OUT" && pwd)
cd "$CACHE"

# host packages: the emulator, and arm64 as a foreign architecture for apt-get download
need=()
command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
command -v cpio >/dev/null || need+=(cpio)
dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; apt-get update -qq; }
if [ ${#need[@]} -gt 0 ]; then
	apt-get update -qq
	# qemu-system-arm 7.2 (bookworm) vs a backports qemu-utils 10.x: same conflict as x86
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades \
		"${need[@]}" qemu-utils/bookworm >/dev/null
fi

# kernel + busybox from Debian's arm64 archive
meta=linux-image-arm64
[ "$FLAVOUR" = cloud ] && meta=linux-image-cloud-arm64
kpkg=$(apt-cache depends "$meta:arm64" | sed -n 's/^ *Depends: \(linux-image-[0-9].*\):arm64$/\1/p' | head -1)
[ -n "$kpkg" ] || { log "cannot resolve $meta"; exit 1; }
if [ ! -d "x-$kpkg" ]; then
	rm -f "$kpkg"_*.deb
	apt-get download "$kpkg:arm64" >/dev/null
	dpkg-deb -x "$kpkg"_*_arm64.deb "x-$kpkg.new"
	# only the kernel image is booted (no modules: everything runs from the initramfs)
	rm -rf "x-$kpkg.new/lib" "x-$kpkg.new/usr" "$kpkg"_*.deb
	mv "x-$kpkg.new" "x-$kpkg"
fi
if [ ! -x x-busybox/bin/busybox ]; then
	rm -f busybox-static_*.deb
	apt-get download busybox-static:arm64 >/dev/null
	dpkg-deb -x busybox-static_*_arm64.deb x-busybox
fi
KERNEL=$CACHE/$(ls "x-$kpkg"/boot/vmlinuz-*)
BUSYBOX=$CACHE/x-busybox/bin/busybox
cd "$OUT"

# initramfs: busybox + /init + the binaries to run
rm -rf initramfs
mkdir -p initramfs/bin initramfs/proc initramfs/sys initramfs/dev initramfs/tmp
cp "$BUSYBOX" initramfs/bin/
runs=
for b in "${BINS[@]}"; do
	cp "$b" "initramfs/bin/$(basename "$b")"
	runs="$runs
echo \"HIL-ARM64-RUN: $(basename "$b")\"
/bin/$(basename "$b") && echo \"HIL-ARM64-RUN-OK: $(basename "$b")\" || echo \"HIL-ARM64-RUN-FAILED: $(basename "$b") rc=\$?\""
done
for f in "${FILES[@]}"; do
	install -D -m 755 "${f%%:*}" "initramfs/${f#*:}"
done
for c in "${RUNS[@]}"; do
	q=$(printf '%q' "$c")
	runs="$runs
echo \"HIL-ARM64-RUN: \"$q
sh -c $q && echo \"HIL-ARM64-RUN-OK: \"$q || echo \"HIL-ARM64-RUN-FAILED: rc=\$? \"$q"
done
end='echo "HIL-ARM64-DONE"; poweroff -f'
[ "$KEEP" = 1 ] && end='echo "HIL-ARM64-DONE"; exec setsid cttyhack sh'
cat >initramfs/init <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "HIL-ARM64-INIT: uptime \$(cut -d' ' -f1 /proc/uptime)s \$(uname -m) \$(uname -r) cpus=\$(grep -c ^processor /proc/cpuinfo)"
$runs
$end
EOF
chmod 755 initramfs/init
(cd initramfs && find . | cpio -o -H newc --quiet | gzip -1) >initramfs.cpio.gz

log "kernel $(basename "$KERNEL") ($(du -h "$KERNEL" | cut -f1)), initramfs $(du -h initramfs.cpio.gz | cut -f1)"
rm -f serial.log
t0=$(date +%s.%N)
qemu=(qemu-system-aarch64 -M virt -cpu cortex-a57 -smp "$SMP" -m 512 -accel tcg
	-kernel "$KERNEL" -initrd initramfs.cpio.gz
	-append "console=ttyAMA0 panic=-1 quiet"
	-nodefaults -no-user-config -display none -no-reboot)
if [ "$KEEP" = 1 ]; then
	exec "${qemu[@]}" -serial mon:stdio
fi
"${qemu[@]}" -serial file:serial.log -monitor none &
qpid=$!
t_init=
while kill -0 $qpid 2>/dev/null; do
	if [ -z "$t_init" ] && grep -aq 'HIL-ARM64-INIT' serial.log 2>/dev/null; then t_init=$(date +%s.%N); fi
	sleep 0.1
done
wait $qpid || true
t_end=$(date +%s.%N)
[ -n "$t_init" ] || t_init=$t_end
tr -d '\r' <serial.log | grep -a 'HIL-' || true
grep -aq 'HIL-ARM64-DONE' serial.log || { log "no HIL-ARM64-DONE; serial.log:"; tail -20 serial.log >&2; exit 1; }
printf 'arm64-boot: %s kernel, smp %s: /init after %.1f s, powered off after %.1f s\n' \
	"$FLAVOUR" "$SMP" "$(echo "$t_init - $t0" | bc)" "$(echo "$t_end - $t0" | bc)"
