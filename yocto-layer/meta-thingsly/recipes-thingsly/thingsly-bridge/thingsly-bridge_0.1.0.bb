SUMMARY = "Thingsly Edge bridge: device enrollment CA and registry"
DESCRIPTION = "The slim server side of Thingsly Edge (enrollment CA, WireGuard address book, \
               DDI server and terminal proxy), for gateways and test rigs built with Yocto."
HOMEPAGE = "https://github.com/thingsly/thingsly-edge"
BUGTRACKER = "https://github.com/thingsly/thingsly-edge/issues"
SECTION = "net"
CVE_PRODUCT = "thingsly-edge"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

require recipes-thingsly/include/thingsly-source.inc
require ${BPN}-crates.inc

inherit cargo systemd useradd

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
