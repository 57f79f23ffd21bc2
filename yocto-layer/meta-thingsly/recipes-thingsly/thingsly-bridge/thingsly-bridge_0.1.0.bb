SUMMARY = "Thingsly Edge bridge: device enrollment CA and registry"
DESCRIPTION = "The slim server side of Thingsly Edge (enrollment CA, WireGuard address book, \
               DDI server and terminal proxy), for gateways and test rigs built with Yocto."
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

CARGO_SRC_DIR = "crates/bridge"

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --user-group --home-dir ${localstatedir}/lib/thingsly-bridge \
                       --no-create-home --shell /sbin/nologin thingsly-bridge"

SYSTEMD_SERVICE:${PN} = "thingsly-bridge.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/thingsly-bridge.service ${D}${systemd_system_unitdir}/
    install -d ${D}${sysconfdir}/thingsly
    install -m 0640 -g thingsly-bridge ${S}/crates/bridge/bridge.example.toml ${D}${sysconfdir}/thingsly/bridge.toml
}

CONFFILES:${PN} = "${sysconfdir}/thingsly/bridge.toml"
FILES:${PN} += "${systemd_system_unitdir}/thingsly-bridge.service"
