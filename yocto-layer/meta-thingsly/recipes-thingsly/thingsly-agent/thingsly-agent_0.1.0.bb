SUMMARY = "Thingsly Edge device agent"
DESCRIPTION = "One daemon for RAUC A/B boards: enrollment, WireGuard tunnel, ThingsBoard MQTT \
               telemetry, Telegraf-compatible metrics to InfluxDB, hawkBit OTA through RAUC, \
               remote terminal."
HOMEPAGE = "https://github.com/thingsly/thingsly-edge"
BUGTRACKER = "https://github.com/thingsly/thingsly-edge/issues"
SECTION = "net"
CVE_PRODUCT = "thingsly-edge"

require recipes-thingsly/include/thingsly-source.inc
require recipes-thingsly/include/thingsly-rust.inc
require ${BPN}-crates.inc
# LICENSE and LIC_FILES_CHKSUM: ours and every crate the binary links (generated).
require ${BPN}-licenses.inc

inherit cargo features_check systemd useradd

# The units are the only way the daemon is started; with sysvinit systemd.bbclass would drop
# them and ship a daemon nothing starts. Skipped (with this reason) unless the distro has systemd.
REQUIRED_DISTRO_FEATURES = "systemd"

# Build the agent package of the workspace.
CARGO_SRC_DIR = "agent"

# Each agent module is a cargo feature; drop one from PACKAGECONFIG to compile it out.
PACKAGECONFIG ??= "telemetry metrics terminal tunnel rauc ota"
PACKAGECONFIG[telemetry] = "--features=telemetry"
PACKAGECONFIG[metrics] = "--features=metrics"
PACKAGECONFIG[terminal] = "--features=terminal"
PACKAGECONFIG[tunnel] = "--features=tunnel"
PACKAGECONFIG[rauc] = "--features=rauc"
# OTA from hawkBit (DDI) through RAUC; implies rauc.
PACKAGECONFIG[ota] = "--features=ota"
CARGO_BUILD_FLAGS += "--no-default-features ${PACKAGECONFIG_CONFARGS}"

# panic = "abort" for the agent: 0.85 MB less on aarch64 (5.52 -> 4.66 MB stripped; no landing
# pads, no .gcc_except_table). Unwinding stays where it is needed: cargo builds build scripts and
# proc-macros with unwind whatever the profile says, OE's libstd-rs (built with panic-unwind)
# links into an abort binary as rustup's std does, and .eh_frame stays for backtraces and the
# -dbg package. The cost: a panic (a bug) ends the whole agent, which systemd restarts
# (Restart=on-failure, 5 s) with its persisted state, instead of the supervisor restarting only
# that module. A bbappend that prefers module isolation to 0.85 MB sets it back:
#   CARGO_PROFILE_RELEASE_PANIC = "unwind"
# The bridge keeps unwind: a panic in one request must not drop every device's connection.
export CARGO_PROFILE_RELEASE_PANIC = "abort"

USERADD_PACKAGES = "${PN}"
# thingsly-terminal: the operators' remote sessions (terminal.user), apart from the agent's
# user, which can read the device key.
USERADD_PARAM:${PN} = "--system --user-group --home-dir ${localstatedir}/lib/thingsly-agent \
                       --no-create-home --shell /sbin/nologin thingsly; \
                       --system --user-group --home-dir ${localstatedir}/lib/thingsly-terminal \
                       --create-home --shell /bin/sh thingsly-terminal"

# The path unit reboots on the agent's request (it runs unprivileged; commands.reboot).
SYSTEMD_SERVICE:${PN} = "thingsly-agent.service thingsly-agent-reboot.path"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    for u in thingsly-agent.service thingsly-agent-reboot.path thingsly-agent-reboot.service; do
        install -m 0644 ${S}/systemd/$u ${D}${systemd_system_unitdir}/
    done
    install -d ${D}${sysconfdir}/thingsly
    # The example lists every key with its default; the image sets [device] id and [enroll].
    install -m 0640 -g thingsly ${S}/agent/agent.example.toml ${D}${sysconfdir}/thingsly/agent.toml
}

CONFFILES:${PN} = "${sysconfdir}/thingsly/agent.toml"
FILES:${PN} += "${systemd_system_unitdir}/thingsly-agent.service \
                ${systemd_system_unitdir}/thingsly-agent-reboot.path \
                ${systemd_system_unitdir}/thingsly-agent-reboot.service"

# The userspace tunnel needs /dev/net/tun (CONFIG_TUN); no WireGuard kernel module.
RRECOMMENDS:${PN} += "kernel-module-tun"
