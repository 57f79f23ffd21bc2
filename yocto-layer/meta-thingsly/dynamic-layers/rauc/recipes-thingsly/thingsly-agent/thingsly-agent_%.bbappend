# Only parsed when meta-rauc is in the build (BBFILES_DYNAMIC): the agent reads the booted
# slot from RAUC over D-Bus and installs bundles through it.
RRECOMMENDS:${PN} += "rauc"
