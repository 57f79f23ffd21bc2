#!/bin/bash
# build-image.sh - build the HIL test disk for QEMU x86_64 from Debian packages only:
#   UEFI (OVMF) -> GRUB (grub-mkstandalone, A/B via grubenv as RAUC's grub backend expects)
#   -> Debian rootfs in slot A (systemd, D-Bus, udev, RAUC, cloud kernel + initrd): bookworm
#      (RAUC 1.8), or trixie with HIL_SUITE=trixie (RAUC 1.13 and a kernel with nbd: streaming
#      and adaptive updates)
#   with the project's thingsly-agent as a systemd service (the project's units, a board
#   drop-in, state on the data partition), plus signed RAUC bundles for slot updates.
#
# Nothing is mounted and no loop device is used: rootfs by mmdebstrap into a directory,
# ext4 by `mkfs.ext4 -d`, FAT by mtools, GPT by sfdisk on a plain file, assembly by dd.
#
# Usage: HIL_AGENT_BIN=... HIL_BRIDGE_BIN=... build-image.sh [--clean] [--no-apt]
#   --clean   rebuild the rootfs too (otherwise $HIL_OUT/rootfs is reused when present)
#   --no-apt  do not install host packages
# Environment: HIL_SUITE (bookworm or trixie), HIL_OUT (default target/hil/out, or
#   target/hil/out-trixie for trixie), HIL_ROOTFS_MIB (512, per slot),
#   HIL_IMG_MIB (size of the ext4 slot image, default 384), HIL_ESP_MIB (32), HIL_DATA_MIB (256),
#   HIL_MIRROR (http://deb.debian.org/debian), HIL_SECURITY_MIRROR (http://deb.debian.org/debian-security),
#   HIL_APT_CACHE (.deb cache kept between builds and clones, default ~/.cache/thingsly-hil/apt),
#   HIL_AGENT_BIN (required: the agent, a release build for x86_64; glibc is fine, the image
#   is bookworm), HIL_BRIDGE_BIN (required: thingsly-bridge, to create the fleet's PKI)
#
# Output in $HIL_OUT:
#   disk.img                GPT: 1 esp (FAT16) | 2 rootfs-a (ext4, v1.0.0) | 3 rootfs-b (empty) | 4 data (ext4)
#   bundles/good.raucb      rootfs v2.0.0            (verity bundle, signed by pki/signing.*)
#   bundles/broken.raucb    rootfs v2.0.1-broken: /sbin/init exits -> kernel panic -> GRUB falls back
#   bundles/unhealthy.raucb rootfs v2.0.2-unhealthy: boots, but the application's health check fails
#   bundles/adaptive.raucb  rootfs v2.0.0 with adaptive=block-hash-index (trixie only): RAUC
#                           fetches only the blocks that differ from what the device's slots hold
#   pki/                    CA (= keyring in the image), signing cert + key
#   fleet/                  the fleet's bridge PKI (CA chain + bootstrap token baked into the image;
#                           the runner's bridges import this CA and token)
#   parts/                  the partition images, BOOTX64.EFI, grubenv
#   build-times.txt         seconds per stage
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SUITE=${HIL_SUITE:-bookworm}
case "$SUITE" in
bookworm) OUT=${HIL_OUT:-$ROOT/target/hil/out} ;;
trixie) OUT=${HIL_OUT:-$ROOT/target/hil/out-trixie} ;;
*) echo "HIL_SUITE: bookworm or trixie, not $SUITE" >&2; exit 2 ;;
esac
# RAUC 1.13 (trixie's) races systemd-udevd when it sets up its streaming NBD device: udev's
# open and close of the new device makes the kernel disconnect it ("disconnect on close")
# before dm-verity holds it, so streaming fails with "verity: Hash device is too small"
# (fixed by RAUC commit cfe93c93, v1.15). The trixie image therefore takes RAUC alone, with
# the libnl it needs, from forky (1.15.2); HIL_RAUC_SUITE= (empty) keeps trixie's 1.13, on
# which the agent falls back to downloading and says so.
RAUC_SUITE=
[ "$SUITE" = bookworm ] || RAUC_SUITE=${HIL_RAUC_SUITE-forky}
# The machine that builds the image (its own packages: qemu-utils pinned to it).
HOST_SUITE=$(. /etc/os-release && echo "$VERSION_CODENAME")
MIRROR=${HIL_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${HIL_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
COMPAT=thingsly-hil-x86_64
ESP_MIB=${HIL_ESP_MIB:-32}
ROOTFS_MIB=${HIL_ROOTFS_MIB:-512}
IMG_MIB=${HIL_IMG_MIB:-384}
DATA_MIB=${HIL_DATA_MIB:-256}
APT_CACHE=${HIL_APT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/thingsly-hil/apt}
AGENT_BIN=${HIL_AGENT_BIN:?HIL_AGENT_BIN: path of the thingsly-agent to install}
BRIDGE_BIN=${HIL_BRIDGE_BIN:?HIL_BRIDGE_BIN: path of thingsly-bridge (creates the fleet PKI)}
CLEAN=0 APT=1
for a in "$@"; do
	case "$a" in
	--clean) CLEAN=1 ;;
	--no-apt) APT=0 ;;
	*) echo "usage: $0 [--clean] [--no-apt]" >&2; exit 2 ;;
	esac
done

log() { echo "build-image: $*" >&2; }
now() { date +%s.%N; }
T_ALL=$(now)
stage_t0=
stage() { stage_t0=$(now); log "== $1"; STAGE=$1; }
stage_end() { printf '%-12s %6.1f s\n' "$STAGE" "$(echo "$(now) - $stage_t0" | bc)" | tee -a "$OUT/build-times.txt" >&2; }

mkdir -p "$OUT"
: >"$OUT/build-times.txt"

# ------------------------------------------------------------------ host packages
stage apt
if [ "$APT" = 1 ]; then
	pkgs=(mmdebstrap qemu-system-x86 ovmf grub-efi-amd64-bin grub-common mtools dosfstools
		e2fsprogs fdisk rauc squashfs-tools openssl socat bc qemu-utils binutils)
	missing=()
	for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
	if [ ${#missing[@]} -gt 0 ]; then
		apt-get update -qq
		# This machine ships qemu-utils from bookworm-backports (10.x), which Breaks
		# bookworm's qemu-system-common (7.2): take qemu-utils back to bookworm's version.
		inst=()
		for p in "${missing[@]}"; do [ "$p" = qemu-utils ] || inst+=("$p"); done
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades \
			"${inst[@]}" "qemu-utils/$HOST_SUITE" >/dev/null
	fi
fi
stage_end

# ------------------------------------------------------------------ PKI for bundle signing
stage pki
PKI=$OUT/pki
if [ ! -s "$PKI/signing.cert.pem" ]; then
	mkdir -p "$PKI"
	cat >"$PKI/openssl.cnf" <<-'EOF'
	[ req ]
	distinguished_name = dn
	prompt = no
	[ dn ]
	CN = unused
	[ v3_ca ]
	basicConstraints = critical,CA:TRUE
	keyUsage = critical,keyCertSign,cRLSign
	subjectKeyIdentifier = hash
	[ v3_leaf ]
	basicConstraints = critical,CA:FALSE
	keyUsage = critical,digitalSignature
	subjectKeyIdentifier = hash
	authorityKeyIdentifier = keyid:always
	EOF
	kt=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1)
	openssl req -x509 "${kt[@]}" -nodes -days 3650 -config "$PKI/openssl.cnf" -extensions v3_ca \
		-subj "/O=thingsly-hil/CN=thingsly-hil RAUC CA" -keyout "$PKI/ca.key.pem" -out "$PKI/ca.cert.pem" 2>/dev/null
	openssl req "${kt[@]}" -nodes -config "$PKI/openssl.cnf" -subj "/O=thingsly-hil/CN=thingsly-hil signer" \
		-keyout "$PKI/signing.key.pem" -out "$PKI/signing.csr" 2>/dev/null
	openssl x509 -req -days 3650 -in "$PKI/signing.csr" -extfile "$PKI/openssl.cnf" -extensions v3_leaf \
		-CA "$PKI/ca.cert.pem" -CAkey "$PKI/ca.key.pem" -set_serial "0x$(openssl rand -hex 8)" \
		-out "$PKI/signing.cert.pem" 2>/dev/null
fi
stage_end

# ------------------------------------------------------------------ rootfs (mmdebstrap, root mode)
ROOTFS=$OUT/rootfs
if [ "$CLEAN" = 1 ] || [ ! -e "$ROOTFS/etc/hil-rootfs-complete" ]; then
	stage rootfs
	rm -rf "$ROOTFS"
	# Runs inside mmdebstrap (chroot with /proc, /sys, /dev set up): $1 = rootfs directory.
	cat >"$OUT/customize.sh" <<-EOF
	#!/bin/sh
	set -eu
	R=\$1
	cp -a '$HERE/guest/.' "\$R/"
	mkdir -p "\$R/boot/efi" "\$R/data"
	chroot "\$R" passwd -d root >/dev/null
	chroot "\$R" useradd --system --user-group --home-dir /var/lib/thingsly-agent --no-create-home \
		--shell /usr/sbin/nologin thingsly
	chroot "\$R" systemctl enable systemd-networkd.service
	# no timers that could wake up during a test (or reach for the network)
	chroot "\$R" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
		e2scrub_reap.service fstrim.timer systemd-timesyncd.service 2>/dev/null || true
	# mmdebstrap's early stage picks usrmerge (and with it perl, 50 MiB) for init-system-helpers'
	# "usrmerge | usr-is-merged"; the tree is merged already and usr-is-merged is included
	# (bookworm only: trixie's minbase has none of them)
	purge=\$(chroot "\$R" dpkg-query -W -f '\${db:Status-Abbrev} \${Package}\\n' usrmerge \
		libfile-find-rule-perl libnumber-compare-perl libtext-glob-perl perl 'perl-modules-*' \
		'libperl5*' 2>/dev/null | awk '/^ii/ { print \$2 }')
	[ -z "\$purge" ] || chroot "\$R" dpkg --purge \$purge >/dev/null
	if [ -n "$RAUC_SUITE" ]; then
		# RAUC from a newer suite, pinned to just what it needs (see RAUC_SUITE above)
		echo "deb $MIRROR $RAUC_SUITE main" >"\$R/etc/apt/sources.list.d/rauc-$RAUC_SUITE.list"
		printf 'Package: *\nPin: release n=%s\nPin-Priority: 100\n' "$RAUC_SUITE" \
			>"\$R/etc/apt/preferences.d/rauc-$RAUC_SUITE"
		# (a testing suite's Release expires within days: a mirror snapshot is older than that)
		chroot "\$R" apt-get -o Acquire::Check-Valid-Until=false update -qq
		DEBIAN_FRONTEND=noninteractive chroot "\$R" apt-get install -y -qq --no-install-recommends \
			rauc/$RAUC_SUITE rauc-service/$RAUC_SUITE >/dev/null
		rm "\$R/etc/apt/sources.list.d/rauc-$RAUC_SUITE.list" "\$R/etc/apt/preferences.d/rauc-$RAUC_SUITE"
		chroot "\$R" apt-get update -qq
	fi
	chroot "\$R" rauc --version >"\$R/etc/hil-rauc-version"
	chroot "\$R" update-initramfs -u -k all
	EOF
	chmod +x "$OUT/customize.sh"
	printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
		"$MIRROR" $SUITE "$MIRROR" $SUITE "$SECURITY_MIRROR" $SUITE >"$OUT/sources.list"
	# .deb cache shared between builds (the sync-in/sync-out pattern from mmdebstrap(1))
	mkdir -p "$APT_CACHE"
	mmdebstrap --variant=minbase --mode=root --format=directory \
		--skip=download/empty --skip=essential/unlink \
		--setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
		--setup-hook="sync-in $APT_CACHE /var/cache/apt/archives/" \
		--customize-hook="sync-out /var/cache/apt/archives $APT_CACHE" \
		--include=usr-is-merged,systemd-sysv,dbus,udev,kmod,rauc,rauc-service,e2fsprogs,grub-common,linux-image-cloud-amd64,initramfs-tools,zstd,curl,iproute2 \
		--dpkgopt='path-exclude=/usr/share/man/*' \
		--dpkgopt='path-exclude=/usr/share/locale/*' \
		--dpkgopt='path-include=/usr/share/locale/locale.alias' \
		--dpkgopt='path-exclude=/usr/share/doc/*' \
		--dpkgopt='path-include=/usr/share/doc/*/copyright' \
		--customize-hook="$OUT/customize.sh" \
		$SUITE "$ROOTFS" - <"$OUT/sources.list" >"$OUT/mmdebstrap.log" 2>&1 ||
		{ tail -30 "$OUT/mmdebstrap.log" >&2; exit 1; }
	touch "$ROOTFS/etc/hil-rootfs-complete"
	stage_end
else
	# keep the overlay current even when the rootfs is reused
	cp -a "$HERE/guest/." "$ROOTFS/"
fi
cp "$PKI/ca.cert.pem" "$ROOTFS/etc/rauc/keyring.pem"
# ------------------------------------------------------------------ the agent, as a board integrates it
stage agent
# The fleet's PKI: the image trusts its CA and carries its bootstrap token (factory provisioning);
# the runner's bridges import both, so one image serves every run.
FLEET=$OUT/fleet
if [ ! -s "$FLEET/data/fleet-token" ]; then
	rm -rf "$FLEET"; mkdir -p "$FLEET"
	printf 'data_dir = "%s"\nlisten = "127.0.0.1:8443"\nserver_names = ["10.0.2.100"]\n[wireguard]\nmode = "off"\n' \
		"$FLEET/data" >"$FLEET/bridge.toml"
	"$BRIDGE_BIN" --config "$FLEET/bridge.toml" init >/dev/null
fi
install -m 755 "$AGENT_BIN" "$ROOTFS/usr/bin/thingsly-agent"
strip "$ROOTFS/usr/bin/thingsly-agent"   # as Yocto's do_package would
for u in thingsly-agent.service thingsly-agent-reboot.path thingsly-agent-reboot.service; do
	install -m 644 "$ROOT/systemd/$u" "$ROOTFS/etc/systemd/system/$u"
done
uid=$(awk -F: '$1 == "thingsly" { print $3 ":" $4 }' "$ROOTFS/etc/passwd")
[ -n "$uid" ] || { log "no user thingsly in the rootfs"; exit 1; }
install -m 644 "$FLEET/data/ca/chain.pem" "$ROOTFS/etc/thingsly/bridge-ca.pem"
install -m 600 -o "${uid%:*}" -g "${uid#*:}" "$FLEET/data/fleet-token" "$ROOTFS/etc/thingsly/bootstrap-token"
chown "root:${uid#*:}" "$ROOTFS/etc/thingsly/agent.toml"; chmod 640 "$ROOTFS/etc/thingsly/agent.toml"
for u in thingsly-agent.service thingsly-agent-reboot.path hil-boot.service; do
	ln -sf "/etc/systemd/system/$u" "$ROOTFS/etc/systemd/system/multi-user.target.wants/$u"
done
"$ROOTFS/usr/bin/thingsly-agent" check-config --config "$ROOTFS/etc/thingsly/agent.toml" >/dev/null
stage_end
# GRUB reads /vmlinuz and /initrd.img (the symlinks Debian keeps in /) from the slot's ext4
[ -e "$ROOTFS/vmlinuz" ] && [ -e "$ROOTFS/initrd.img" ] || { log "kernel symlinks missing in rootfs"; exit 1; }

# ------------------------------------------------------------------ slot images (mkfs.ext4 -d)
stage slot-images
P=$OUT/parts
mkdir -p "$P" "$OUT/bundles"
mkslot() { # mkslot VERSION OUT.ext4
	echo "$1" >"$ROOTFS/etc/hil-version"
	# The image's version, as a Yocto distro writes it (DISTRO_VERSION); the agent reports it
	# for a slot RAUC has not installed (the factory slot A).
	printf 'PRETTY_NAME="Thingsly HIL %s"\nNAME="Thingsly HIL"\nID=thingsly-hil\nID_LIKE=debian\nVERSION_ID=%s\n' \
		"$1" "$1" >"$ROOTFS/etc/os-release"
	rm -f "$2"
	if [ "$SUITE" = bookworm ]; then
		mkfs.ext4 -q -F -L rootfs -d "$ROOTFS" "$2" "${IMG_MIB}M"
	else
		# The same UUID, hash seed and time for every slot image, as a reproducible image
		# build makes them: versions then differ only in the blocks of what changed, which is
		# what an adaptive update (block-hash-index) can skip. metadata_csum is seeded with
		# the UUID, so a random one would make every directory and inode block differ.
		E2FSPROGS_FAKE_TIME=1767225600 mkfs.ext4 -q -F -L rootfs -U "$SLOT_UUID" \
			-E "hash_seed=$SLOT_UUID" -d "$ROOTFS" "$2" "${IMG_MIB}M"
	fi
}
SLOT_UUID=5d1c3c3e-7c55-4a8e-9d1e-6f0c1a3b2e11
# a build that died while the broken init was in place must not leak it into the next one
[ -L "$ROOTFS/usr/sbin/init" ] || { rm -f "$ROOTFS/usr/sbin/init"; ln -s /lib/systemd/systemd "$ROOTFS/usr/sbin/init"; }
mkslot 1.0.0 "$P/rootfs-1.0.0.ext4"
mkslot 2.0.0 "$P/rootfs-2.0.0.ext4"
# broken slot: init exits at once -> "Attempted to kill init" panic -> panic=5 reboots
init=$(readlink "$ROOTFS/usr/sbin/init")
rm "$ROOTFS/usr/sbin/init"
printf '#!/bin/sh\necho "HIL-BROKEN-INIT: this slot does not boot"\nexit 1\n' >"$ROOTFS/usr/sbin/init"
chmod 755 "$ROOTFS/usr/sbin/init"
mkslot 2.0.1-broken "$P/rootfs-2.0.1-broken.ext4"
rm "$ROOTFS/usr/sbin/init"
ln -s "$init" "$ROOTFS/usr/sbin/init"
# unhealthy slot: boots and runs the agent, but the application's health check fails
health=$ROOTFS/usr/libexec/hil/app-health
cp "$health" "$OUT/app-health.good"
printf '#!/bin/sh\necho "hil-app: database schema 7 is newer than this release supports (6)" >&2\nexit 1\n' >"$health"
mkslot 2.0.2-unhealthy "$P/rootfs-2.0.2-unhealthy.ext4"
install -m 755 "$OUT/app-health.good" "$health"
echo 1.0.0 >"$ROOTFS/etc/hil-version"
stage_end

# ------------------------------------------------------------------ RAUC bundles
stage bundles
mkbundle() { # mkbundle VERSION SLOTIMG OUT [MANIFEST-LINE]
	local d
	d=$(mktemp -d "$OUT/bundle.XXXXXX")
	cat >"$d/manifest.raucm" <<-EOF
	[update]
	compatible=$COMPAT
	version=$1
	[bundle]
	format=verity
	[image.rootfs]
	filename=rootfs.ext4
	${4:-}
	EOF
	ln "$2" "$d/rootfs.ext4" 2>/dev/null || cp "$2" "$d/rootfs.ext4"
	rm -f "$3"
	# zstd level 3: 1.8 s instead of 69 s for mksquashfs's default gzip, 107 vs 103 MiB
	rauc bundle --cert="$PKI/signing.cert.pem" --key="$PKI/signing.key.pem" \
		--keyring="$PKI/ca.cert.pem" --mksquashfs-args="-comp zstd -Xcompression-level 3" \
		"$d" "$3" >/dev/null
	rm -rf "$d"
}
mkbundle 2.0.0 "$P/rootfs-2.0.0.ext4" "$OUT/bundles/good.raucb"
mkbundle 2.0.1-broken "$P/rootfs-2.0.1-broken.ext4" "$OUT/bundles/broken.raucb"
mkbundle 2.0.2-unhealthy "$P/rootfs-2.0.2-unhealthy.ext4" "$OUT/bundles/unhealthy.raucb"
if [ "$SUITE" != bookworm ]; then
	# RAUC (1.8 here, 1.13 in the guest) writes the image's block hash index into the bundle.
	mkbundle 2.0.0 "$P/rootfs-2.0.0.ext4" "$OUT/bundles/adaptive.raucb" "adaptive=block-hash-index"
fi
stage_end

# ------------------------------------------------------------------ ESP (grub-mkstandalone + mtools)
stage esp
grub-mkstandalone -O x86_64-efi -o "$P/BOOTX64.EFI" \
	--modules="part_gpt fat ext2 normal configfile loadenv test echo linux" \
	--locales= --themes= --fonts= \
	"boot/grub/grub.cfg=$HERE/esp/embedded.cfg"
rm -f "$P/grubenv"
grub-editenv "$P/grubenv" create
grub-editenv "$P/grubenv" set "ORDER=A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0
rm -f "$P/esp.img"
truncate -s "${ESP_MIB}M" "$P/esp.img"
# FAT16, 512-byte sectors, geometry 32 tracks x 64 heads x 32 sectors per MiB-ish chunk
mformat -i "$P/esp.img" -t $((ESP_MIB)) -h 64 -s 32 -v HILESP ::
mmd -i "$P/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$P/esp.img" "$P/BOOTX64.EFI" "$HERE/esp/grub.cfg" "$P/grubenv" ::/EFI/BOOT/
stage_end

# ------------------------------------------------------------------ data partition + GPT disk
stage disk
rm -f "$P/data.ext4"
mkfs.ext4 -q -F -L data "$P/data.ext4" "${DATA_MIB}M"
DISK=$OUT/disk.img
rm -f "$DISK"
total=$((1 + ESP_MIB + 2 * ROOTFS_MIB + DATA_MIB + 1))
truncate -s "${total}M" "$DISK"
S=2048 # sectors per MiB
sfdisk -q "$DISK" <<-EOF
label: gpt
unit: sectors
first-lba: 2048
start=$S, size=$((ESP_MIB * S)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="esp"
size=$((ROOTFS_MIB * S)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="rootfs-a"
size=$((ROOTFS_MIB * S)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="rootfs-b"
size=$((DATA_MIB * S)), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="data"
EOF
# write each partition image at the start sector sfdisk chose
put() { # put PARTNO IMAGE
	local start
	start=$(sfdisk -d "$DISK" | sed -n "s|^$DISK$1 : start= *\([0-9]*\),.*|\1|p")
	[ -n "$start" ] || { log "no partition $1"; exit 1; }
	dd if="$2" of="$DISK" bs=1M seek=$((start / S)) conv=notrunc,sparse status=none
}
put 1 "$P/esp.img"
put 2 "$P/rootfs-1.0.0.ext4"
put 4 "$P/data.ext4"
stage_end

printf '%-12s %6.1f s\n' total "$(echo "$(now) - $T_ALL" | bc)" | tee -a "$OUT/build-times.txt" >&2
log "disk: $DISK ($(du -h --apparent-size "$DISK" | cut -f1) apparent, $(du -h "$DISK" | cut -f1) on disk)"
log "bundles: $(cd "$OUT/bundles" && du -h ./*.raucb | tr '\n\t' '  ')"
