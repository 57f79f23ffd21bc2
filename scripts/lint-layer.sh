#!/usr/bin/env bash
# Lints the Yocto layer with oelint-adv (PyPI, in a venv under target/) for wrynose and scarthgap
# and fails on any finding, except these, suppressed for the reasons given:
#   oelint.vars.homepageping   checks HOMEPAGE over the network, which CI does not have
#   oelint.var.bbclassextend   agent and bridge are target daemons: no -native/-nativesdk variant
# Also fails when the crates.inc files no longer match Cargo.lock.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/oelint-venv
if [[ ! -x $venv/bin/oelint-adv ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'oelint-adv==9.11.2'
fi
python3 scripts/gen-crates-inc.py --check
cd yocto-layer/meta-thingsly
mapfile -t files < <(find . -name '*.bb' -o -name '*.bbappend' -o -name '*.inc' | sort)
for release in wrynose scarthgap; do
  out=$("../../$venv/bin/oelint-adv" --quiet --relpaths --release "$release" --mode all \
    --suppress oelint.vars.homepageping --suppress oelint.var.bbclassextend "${files[@]}" 2>&1 || true)
  if [[ -n $out ]]; then echo "oelint-adv ($release):"; echo "$out"; exit 1; fi
done
echo "meta-thingsly: oelint-adv clean (wrynose, scarthgap), crates.inc up to date"
