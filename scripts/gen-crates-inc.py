#!/usr/bin/env python3
"""Writes the Yocto layer's generated includes from Cargo.lock and the crates' own metadata.

- `${BPN}-crates.inc`: what OE's `bitbake -c update_crates` produces (one `crate://` SRC_URI per
  registry package and its sha256 from the lockfile), without bitbake or network.
- `${BPN}-licenses.inc`: `LICENSE` and `LIC_FILES_CHKSUM` for what the recipe's binary links
  (our own Apache-2.0 plus every crate in `cargo tree -e normal,no-proc-macro` for the recipe's
  package, default PACKAGECONFIG features and an aarch64 Linux target), each crate's license
  files with their md5, so `do_populate_lic`, the license manifest and the SPDX SBOM describe the
  binary. Needs the crates' sources: cargo's registry cache (a built checkout has it), or with
  `--manifest-path DIR/Cargo.toml` any tree cargo can resolve offline (the recipe-build check
  runs it on the tree at SRCREV with the vendored crates).

`--check` exits 1 when a committed file is stale, so CI catches a Cargo.lock or feature change
that was not carried into the layer. `--print-licenses RECIPE` writes one licenses.inc to stdout.
"""
import hashlib
import json
import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYER = ROOT / "yocto-layer" / "meta-thingsly" / "recipes-thingsly"
RECIPES = ["thingsly-agent", "thingsly-bridge"]
REGISTRY = "registry+https://github.com/rust-lang/crates.io-index"
# A board target: which crates are linked depends on the target (cfg dependencies).
LICENSE_TARGET = "aarch64-unknown-linux-gnu"
# SPDX ids as they appear in the crates, mapped to OE's license names (meta/files/common-licenses).
# A crate with an id that is not here stops the generator: a new license needs a person to read
# it (and, for a copyleft one, to decide) before it ships.
OE_LICENSE = {
    "0BSD": "0BSD",
    "Apache-2.0": "Apache-2.0",
    "Apache-2.0 WITH LLVM-exception": "Apache-2.0-with-LLVM-exception",
    "BSD-2-Clause": "BSD-2-Clause",
    "BSD-3-Clause": "BSD-3-Clause",
    "BSL-1.0": "BSL-1.0",
    "CC0-1.0": "CC0-1.0",
    "CDLA-Permissive-2.0": "CDLA-Permissive-2.0",
    "ISC": "ISC",
    "MIT": "MIT",
    # smartstring (casbin's rhai): "MPL-2.0+" is the deprecated SPDX form; MPL-2.0 already lets
    # the recipient choose a later version (its section 10.2), so OE's MPL-2.0 text is the one.
    "MPL-2.0": "MPL-2.0",
    "MPL-2.0+": "MPL-2.0",
    "Unicode-3.0": "Unicode-3.0",
    "Unicode-DFS-2016": "Unicode-DFS-2016",
    "Unlicense": "Unlicense",
    "Zlib": "Zlib",
}
# A crate's license texts: top-level files named so (what cargo-about and OE's recipetool look at).
LICENSE_FILE = re.compile(r"^(licen[cs]e|copying|unlicense|notice)([-_.].*)?$", re.IGNORECASE)


def recipe_vars(recipe: str) -> dict:
    """The few assignments of a recipe that decide what it builds (plain `VAR = "..."` lines)."""
    text = (LAYER / recipe / f"{recipe}_0.1.0.bb").read_text()
    text = text.replace("\\\n", " ")
    found = {}
    for m in re.finditer(r'^([A-Z_]+(?:\[[a-z]+\])?)\s*(\?\?=|\+=|=)\s*"([^"]*)"', text, re.M):
        found.setdefault(m.group(1), []).append(m.group(3))
    return found


def recipe_cargo_args(recipe: str) -> tuple[str, list[str]]:
    """(CARGO_SRC_DIR, the cargo feature arguments its default PACKAGECONFIG builds with)."""
    v = recipe_vars(recipe)
    src_dir = v["CARGO_SRC_DIR"][0]
    args = []
    if any("--no-default-features" in f for f in v.get("CARGO_BUILD_FLAGS", [])):
        args.append("--no-default-features")
    for item in (v.get("PACKAGECONFIG", [""])[0]).split():
        flag = v[f"PACKAGECONFIG[{item}]"][0]
        args += flag.split(",")[0].split()
    return src_dir, args


def oe_expression(spdx: str, crate: str) -> str:
    """A crate's SPDX expression in OE's syntax (`|`, `&`, OE names); the old `A/B` form is OR."""
    spdx = spdx.replace("/", " OR ")
    out = []
    for tok in re.findall(r"\(|\)|[A-Za-z0-9.+-]+(?: WITH [A-Za-z0-9.+-]+)?", spdx):
        if tok in ("(", ")"):
            out.append(tok)
        elif tok == "OR":
            out.append("|")
        elif tok == "AND":
            out.append("&")
        elif tok in OE_LICENSE:
            out.append(OE_LICENSE[tok])
        else:
            raise SystemExit(f"{crate}: license {tok!r} is not in OE_LICENSE (scripts/gen-crates-inc.py)")
    return " ".join(out).replace("( ", "(").replace(" )", ")")


def split_top(expr: str, op: str) -> list[str]:
    """EXPR split at OP outside parentheses, each part without parentheses around all of it."""
    parts, depth, cur = [], 0, ""
    for ch in expr:
        depth += ch == "("
        depth -= ch == ")"
        if ch == op and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    out = []
    for part in parts:
        while part.startswith("(") and part.endswith(")") and balanced(part[1:-1]):
            part = part[1:-1].strip()
        out.append(part)
    return out


def balanced(expr: str) -> bool:
    """No parenthesis in EXPR closes one opened before it: "(A) & (B)" minus its ends is not."""
    depth = 0
    for ch in expr:
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            return False
    return depth == 0


def license_terms(expr: str) -> set[str]:
    """The conjuncts of EXPR, each in one spelling ("MIT | Apache-2.0" = "Apache-2.0 | MIT")."""
    terms = set()
    for part in split_top(expr, "&"):
        alternatives = split_top(part, "|")
        if len(alternatives) == 1:
            terms.add(part)
        else:
            terms.add("(" + " | ".join(sorted(set(alternatives))) + ")")
    return terms


def linked_crates(manifest: pathlib.Path, package: str, args: list[str]) -> list[dict]:
    """The registry crates linked into PACKAGE's binaries, with their metadata.

    cargo may download crates it has not seen (a checkout that built only for x86_64 has none of
    the crates that are only for other targets); with vendored crates it finds them there."""
    common = ["--locked", "--manifest-path", str(manifest)]
    tree = subprocess.run(
        ["cargo", "tree", "-q", *common, "-p", package, *args, "--target", LICENSE_TARGET,
         "-e", "normal,no-proc-macro", "--prefix", "none", "-f", "{p}"],
        check=True, capture_output=True, text=True).stdout
    wanted = set()
    for line in tree.splitlines():
        m = re.match(r"^(\S+) v(\S+)( \(.*\))?", line)
        if m and not (m.group(3) or "").startswith(" (/"):
            wanted.add((m.group(1), m.group(2)))
    meta = json.loads(subprocess.run(
        ["cargo", "metadata", "-q", *common, "--format-version", "1"],
        check=True, capture_output=True, text=True).stdout)
    crates = [p for p in meta["packages"] if (p["name"], p["version"]) in wanted and p["source"]]
    missing = wanted - {(p["name"], p["version"]) for p in crates}
    if missing:
        raise SystemExit(f"no metadata for {sorted(missing)}")
    return sorted(crates, key=lambda p: (p["name"], p["version"]))


# Files a package compiles in that are not crates (include_str!), with their SPDX license:
# their license file goes into LIC_FILES_CHKSUM when the tree has it.
VENDORED = {
    "crates/bridge": [("assets/xterm/LICENSE", "MIT", "xterm.js 6.0.0 (the terminal page)")],
}


def render_licenses(recipe: str, manifest_root: pathlib.Path) -> str:
    src_dir, args = recipe_cargo_args(recipe)
    pkgconfig = "PACKAGECONFIG " + " ".join(a.split("=", 1)[1] for a in args if a.startswith("--features=")) \
        if any(a.startswith("--features=") for a in args) else "default features"
    package = tomllib.loads((manifest_root / src_dir / "Cargo.toml").read_text())["package"]["name"]
    crates = linked_crates(manifest_root / "Cargo.toml", package, args)
    own = "Apache-2.0"
    own_md5 = hashlib.md5((manifest_root / "LICENSE").read_bytes()).hexdigest()
    terms, files, bare = set(), [], []
    for p in crates:
        cid = f"{p['name']}-{p['version']}"
        if not p.get("license"):
            raise SystemExit(f"{cid}: no SPDX license in its Cargo.toml")
        terms |= license_terms(oe_expression(p["license"], cid))
        crate_dir = pathlib.Path(p["manifest_path"]).parent
        names = sorted(f.name for f in crate_dir.iterdir() if f.is_file() and LICENSE_FILE.match(f.name))
        if p.get("license_file") and p["license_file"] not in names:
            names.append(p["license_file"])
        for name in names:
            md5 = hashlib.md5((crate_dir / name).read_bytes()).hexdigest()
            files.append(f"file://${{CARGO_VENDORING_DIRECTORY}}/{cid}/{name};md5={md5}")
        if not names:
            bare.append(cid)
    vendored = []
    for rel, spdx, what in VENDORED.get(src_dir, []):
        f = manifest_root / src_dir / rel
        if f.exists():
            terms.add(spdx)
            files.append(f"file://{src_dir}/{rel};md5={hashlib.md5(f.read_bytes()).hexdigest()}")
            vendored.append(f"{what}: {spdx}")
    expr = " & ".join([own] + sorted(terms - {own}))
    out = [
        "# Generated by scripts/gen-crates-inc.py from Cargo.lock and the crates' metadata; do not edit.",
        f"# {package} ({pkgconfig}) for {LICENSE_TARGET} links {len(crates)} crates:",
        "# their licenses and license files, with ours.",
        "# Crates whose license text is only OE's generic one (no file of their own): "
        + (", ".join(bare) or "none") + ".",
        *(["# Compiled in besides crates: " + ", ".join(vendored) + "."] if vendored else []),
        "",
        f'LICENSE = "{expr}"',
        f'LIC_FILES_CHKSUM = "file://LICENSE;md5={own_md5} \\',
    ]
    out += [f"                    {f} \\" for f in files]
    out += ['"', ""]
    return "\n".join(out)


def render() -> str:
    lock = tomllib.loads((ROOT / "Cargo.lock").read_text())
    crates = sorted(
        (p["name"], p["version"], p["checksum"])
        for p in lock["package"]
        if p.get("source") == REGISTRY
    )
    uris = [f"crate://crates.io/{n}/{v}" for n, v, _ in crates]
    # First URI on the assignment line: no leading space inside the quotes (oelint-adv).
    out = ["# Generated by scripts/gen-crates-inc.py from Cargo.lock; do not edit.", ""]
    out.append(f'SRC_URI += "{uris[0]} \\')
    out += [f"            {u} \\" for u in uris[1:]]
    out += ['"', ""]
    out += [f'SRC_URI[{n}-{v}.sha256sum] = "{c}"' for n, v, c in crates]
    return "\n".join(out) + "\n"


def main() -> int:
    argv = sys.argv[1:]
    root = ROOT
    if "--manifest-path" in argv:
        root = pathlib.Path(argv[argv.index("--manifest-path") + 1]).resolve().parent
    if "--print-licenses" in argv:
        sys.stdout.write(render_licenses(argv[argv.index("--print-licenses") + 1], root))
        return 0
    check = "--check" in argv
    crates = render()
    stale = []
    for recipe in RECIPES:
        for path, text in (
            (LAYER / recipe / f"{recipe}-crates.inc", crates),
            (LAYER / recipe / f"{recipe}-licenses.inc", render_licenses(recipe, root)),
        ):
            if check:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path.relative_to(ROOT)))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if stale:
        print("stale (run scripts/gen-crates-inc.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
