# With meta-rauc in the build, the packagegroup brings RAUC next to the agent.
# Appended to the base recipe's list, so it cannot be sorted with it.
# nooelint: oelint.vars.dependsordered
RDEPENDS:${PN} += "rauc"
