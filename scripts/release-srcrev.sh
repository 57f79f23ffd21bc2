#!/usr/bin/env bash
# Release procedure for the Yocto layer: point SRCREV at COMMIT (default HEAD; a commit that is
# on the branch SRC_URI names) and regenerate crates.inc from that commit's Cargo.lock, together,
# then check. Commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=$(git rev-parse "${1:-HEAD}^{commit}")
cmp -s <(git show "$rev:Cargo.lock") Cargo.lock || { echo "check out $rev first: crates.inc is generated from Cargo.lock" >&2; exit 1; }
sed -i "s/^SRCREV = \".*\"/SRCREV = \"$rev\"/" yocto-layer/meta-thingsly/recipes-thingsly/include/thingsly-source.inc
python3 scripts/gen-crates-inc.py
scripts/check-srcrev.sh
