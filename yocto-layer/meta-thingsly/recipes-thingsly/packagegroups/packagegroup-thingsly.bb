SUMMARY = "Thingsly Edge on a device"
DESCRIPTION = "Everything a device needs to join Thingsly Edge: the agent, and RAUC when \
               meta-rauc is in the build. Add it with IMAGE_INSTALL:append = \" packagegroup-thingsly\"."
HOMEPAGE = "https://github.com/thingsly/thingsly-edge"
BUGTRACKER = "https://github.com/thingsly/thingsly-edge/issues"
SECTION = "net"
LICENSE = "MIT"

inherit features_check packagegroup

# As the agent's recipe: its units need systemd, so the group is skipped with the same reason.
REQUIRED_DISTRO_FEATURES = "systemd"

RDEPENDS:${PN} = "thingsly-agent"
