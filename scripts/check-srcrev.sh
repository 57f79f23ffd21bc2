#!/usr/bin/env bash
# The Yocto recipes build the tree at SRCREV (thingsly-source.inc), not this checkout: check
# that tree has what the recipes use. Every PACKAGECONFIG feature must be a feature of the agent
# at SRCREV, every ${S}/ file do_install names must exist there, and its Cargo.lock must be the
# one crates.inc was generated from (gen-crates-inc.py --check compares with this checkout's), and
# its rust-version must be the Rust the recipes demand at parse time (THINGSLY_RUST_MIN).
set -euo pipefail
cd "$(dirname "$0")/.."
layer=yocto-layer/meta-thingsly/recipes-thingsly
rev=$(sed -n 's/^SRCREV = "\([0-9a-f]*\)"/\1/p' "$layer/include/thingsly-source.inc")
git cat-file -e "$rev^{commit}" 2>/dev/null || { echo "SRCREV $rev is not a commit of this repository" >&2; exit 1; }
fail=0
features=$(git show "$rev:agent/Cargo.toml" | sed -n '/^\[features\]/,/^\[/p')
for f in $(sed -n 's/^PACKAGECONFIG\[\([a-z]*\)\].*/\1/p' "$layer"/thingsly-agent/*.bb); do
  grep -q "^$f *=" <<<"$features" || { echo "SRCREV $rev: agent has no feature $f (PACKAGECONFIG[$f])" >&2; fail=1; }
done
for bb in "$layer"/*/*.bb; do
  # ${S}/path and the loop over systemd units in do_install.
  files=$(grep -o '\${S}/[A-Za-z0-9_./-]*' "$bb" | sed 's|\${S}/||' | grep -v '\$' || true)
  units=$(sed -n 's/^ *for u in \(.*\); do$/\1/p' "$bb")
  for u in $units; do files+=$'\n'"systemd/$u"; done
  for p in $files; do
    [[ -z $p || $p == */ ]] && continue
    git cat-file -e "$rev:$p" 2>/dev/null || { echo "SRCREV $rev: $(basename "$bb") installs $p, which is not there" >&2; fail=1; }
  done
done
need=$(sed -n 's/^THINGSLY_RUST_MIN = "\(.*\)"/\1/p' "$layer/include/thingsly-rust.inc")
has=$(git show "$rev:Cargo.toml" | sed -n 's/^rust-version = "\(.*\)"/\1/p')
[[ $need == "$has" ]] || { echo "SRCREV $rev: rust-version is $has, thingsly-rust.inc's THINGSLY_RUST_MIN is $need" >&2; fail=1; }
cmp -s <(git show "$rev:Cargo.lock") Cargo.lock || { echo "SRCREV $rev: Cargo.lock differs from this checkout's, so crates.inc does not match it; bump with scripts/release-srcrev.sh" >&2; fail=1; }
((fail == 0)) && echo "SRCREV $rev: features, installed files, rust-version and Cargo.lock match the recipes"
exit $fail
