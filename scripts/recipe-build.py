#!/usr/bin/env python3
"""Builds the Yocto recipes' binaries the way bitbake would, without bitbake (CI has no poky).

For each recipe of meta-thingsly (agent, bridge), from the tree at SRCREV (thingsly-source.inc),
what OE's fetcher and cargo class do (bitbake lib/bb/fetch2/crate.py, oe-core
classes-recipe/cargo_common.bbclass and cargo.bbclass):

  do_fetch     every crate its crates.inc lists, from static.crates.io, checked against the
               SRC_URI[...sha256sum] given there (a cache under target/ plays DL_DIR)
  do_unpack    `git archive SRCREV` as S; each crate into cargo_home/bitbake/NAME-VERSION with the
               .cargo-checksum.json the crate fetcher writes
  do_configure cargo_home/config.toml as cargo_common_do_configure writes it: crates.io replaced
               by the vendored directory, so nothing that crates.inc lacks can be had
  do_compile   cargo build -v --frozen --target <board> --release --manifest-path
               S/CARGO_SRC_DIR/Cargo.toml plus the recipe's CARGO_BUILD_FLAGS and its default
               PACKAGECONFIG's --features, with Rust THINGSLY_RUST_MIN (thingsly-rust.inc), run
               from B so the source tree's .cargo/config.toml is not read (as in bitbake)
  do_install   the executable cargo_do_install would pick up exists and is an aarch64 ELF file
               (the ${S}/ files do_install:append names: scripts/check-srcrev.sh)
  licenses     the recipe's licenses.inc is what gen-crates-inc.py derives from S and the
               vendored crates (the files LIC_FILES_CHKSUM names, with their md5)

Before that, what no build shows: a recipe that installs systemd units must require the systemd
distro feature (else sysvinit images ship a daemon nothing starts), and both READMEs must give the
agent's default PACKAGECONFIG as the recipe has it.

Differences from bitbake, on purpose: the target is rustup's aarch64-unknown-linux-gnu with
Debian's cross gcc (bitbake uses its own target spec and toolchain); the two recipes share one
target directory and one vendored crate tree when their crates.inc agree, which only saves CI
minutes (each still builds with its own flags). CI runs it with --debug-build (DEBUG_BUILD = "1",
which the cargo class also supports: no --release), measured 3 min 52 s for both instead of 11 min 28 s on 2 cores; the
problems it looks for do not depend on the optimisation level.
With --release (the default) it also writes the binary as the package ships it (stripped the way
OE's do_package strips) to target/recipe-build/NAME.stripped: what scripts/bench-footprint.sh
measures. The recipe's `export` lines (the CARGO_PROFILE_RELEASE_* size settings) are in the
build's environment, as bitbake exports them to do_compile.
Usage: scripts/recipe-build.py [--srcrev COMMIT] [--debug-build] [--only thingsly-agent|thingsly-bridge]
"""
import concurrent.futures
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYER = ROOT / "yocto-layer" / "meta-thingsly" / "recipes-thingsly"
WORK = ROOT / "target" / "recipe-build"
DL_DIR = WORK / "downloads"
RECIPES = ["thingsly-agent", "thingsly-bridge"]
TARGET = "aarch64-unknown-linux-gnu"
LINKER = "aarch64-linux-gnu-gcc"
sys.path.insert(0, str(ROOT / "scripts"))
gen = __import__("gen-crates-inc")


def fail(msg: str) -> None:
    print(f"recipe-build: {msg}", file=sys.stderr)
    sys.exit(1)


def layer_var(path: pathlib.Path, name: str) -> str:
    m = re.search(rf'^{name} = "([^"]*)"', path.read_text(), re.M)
    if not m:
        fail(f"{path.relative_to(ROOT)}: no {name}")
    return m.group(1)


def recipe_exports(recipe: str) -> dict[str, str]:
    """`export NAME = "VALUE"` of the recipe and the layer includes it requires: what bitbake
    puts in do_compile's environment (the CARGO_PROFILE_RELEASE_* size settings)."""
    bb = LAYER / recipe / f"{recipe}_0.1.0.bb"
    texts = [bb.read_text()]
    for inc in re.findall(r"^require (recipes-thingsly/\S+\.inc)$", texts[0], re.M):
        texts.append((LAYER.parent / inc).read_text())
    out = {}
    for text in texts:
        out.update(re.findall(r'^export (\w+) = "([^"]*)"', text, re.M))
    return out


def crates_of(recipe: str) -> list[tuple[str, str, str]]:
    """(name, version, sha256) of every crate:// in the recipe's crates.inc."""
    text = (LAYER / recipe / f"{recipe}-crates.inc").read_text()
    sums = dict(re.findall(r'^SRC_URI\[([^\]]+)\.sha256sum\] = "([0-9a-f]{64})"', text, re.M))
    out = []
    for name, version in re.findall(r"crate://crates\.io/([^/\s]+)/([^\s\\\"]+)", text):
        key = f"{name}-{version}"
        if key not in sums:
            fail(f"{recipe}-crates.inc: crate://crates.io/{name}/{version} has no SRC_URI[{key}.sha256sum]")
        out.append((name, version, sums[key]))
    return out


def fetch(crate: tuple[str, str, str]) -> pathlib.Path:
    """do_fetch of one crate: the file in DL_DIR, whose sha256 must be the recipe's."""
    name, version, sha = crate
    path = DL_DIR / f"{name}-{version}.crate"
    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
        url = f"https://static.crates.io/crates/{name}/{version}/download"
        for attempt in range(4):
            try:
                with urllib.request.urlopen(url, timeout=60) as r:
                    data = r.read()
                break
            except OSError as e:
                if attempt == 3:
                    fail(f"fetching {url}: {e}")
                time.sleep(2 ** attempt)
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            fail(f"{name}-{version}: checksum mismatch: crates.io has {got}, SRC_URI[{name}-{version}.sha256sum] says {sha}")
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def unpack(crates: list, files: list[pathlib.Path], vendor: pathlib.Path) -> None:
    vendor.mkdir(parents=True)
    for (name, version, sha), path in zip(crates, files):
        with tarfile.open(path) as tar:
            # The "data" filter (no absolute paths, links out, devices) where Python has it.
            if hasattr(tarfile, "data_filter"):
                tar.extractall(vendor, filter="data")
            else:
                tar.extractall(vendor)
        (vendor / f"{name}-{version}" / ".cargo-checksum.json").write_text(
            json.dumps({"files": {}, "package": sha}))


def configure(cargo_home: pathlib.Path, vendor: pathlib.Path, target_dir: pathlib.Path) -> None:
    (cargo_home / "config.toml").write_text(f"""# EXTRA_OECARGO_PATHS
paths = [
]

# Local mirror vendored by bitbake
[source.bitbake]
directory = "{vendor}"

[source.crates-io]
replace-with = "bitbake"
local-registry = "/nonexistent"

[http]
multiplexing = false

# HOST_SYS
[target.{TARGET}]
linker = "{LINKER}"

[build]
target-dir = "{target_dir}"
""")


def build_recipe(recipe: str, src: pathlib.Path, rust: str, release: bool, target_dir: pathlib.Path) -> None:
    started = time.monotonic()
    rdir = WORK / recipe
    shutil.rmtree(rdir, ignore_errors=True)
    crates = crates_of(recipe)
    DL_DIR.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        files = list(pool.map(fetch, crates))
    cargo_home = rdir / "cargo_home"
    cargo_home.mkdir(parents=True)
    # One vendored tree for recipes whose crates.inc list the same crates (ours list the whole
    # Cargo.lock): bitbake unpacks one per recipe, but the same sources at the same path let the
    # second build reuse the first one's dependencies in the shared target directory.
    key = hashlib.sha256(repr(crates).encode()).hexdigest()[:16]
    vendor = WORK / f"vendor-{key}"
    if not vendor.exists():
        tmp = WORK / f"vendor-{key}.part"
        shutil.rmtree(tmp, ignore_errors=True)
        unpack(crates, files, tmp)
        tmp.rename(vendor)
    configure(cargo_home, vendor, target_dir)
    build = rdir / "build"
    build.mkdir()

    src_dir, feature_args = gen.recipe_cargo_args(recipe)
    manifest = src / src_dir / "Cargo.toml"
    if not manifest.exists():
        fail(f"{recipe}: CARGO_SRC_DIR {src_dir} has no Cargo.toml at SRCREV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARGO", "RUST"))}
    env.update(
        CARGO_HOME=str(cargo_home),
        RUSTUP_TOOLCHAIN=rust,
        RUST_BACKTRACE="1",
        RUSTFLAGS="",
        CC_aarch64_unknown_linux_gnu=LINKER,
        AR_aarch64_unknown_linux_gnu="aarch64-linux-gnu-ar",
    )
    env.update(recipe_exports(recipe))
    cmd = ["cargo", "build", "-v", "--frozen", "--target", TARGET, *(["--release"] if release else []),
           f"--manifest-path={manifest}", *feature_args]
    log = rdir / "compile.log"
    with log.open("w") as out:
        print("$ " + " ".join(cmd), file=out, flush=True)
        rc = subprocess.run(cmd, cwd=build, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text().splitlines()[-25:]
        fail(f"{recipe}: do_compile failed (Rust {rust}); {log.relative_to(ROOT)} ends:\n" + "\n".join(tail))

    # cargo_do_install: every executable file directly in the target's build dir goes to bindir.
    outdir = target_dir / TARGET / ("release" if release else "debug")
    package = gen.tomllib.loads(manifest.read_text())["package"]["name"]
    binary = outdir / package
    if not binary.is_file() or not os.access(binary, os.X_OK):
        fail(f"{recipe}: no executable {package} in {outdir}")
    kind = subprocess.run(["file", "-b", str(binary)], capture_output=True, text=True).stdout
    if "ARM aarch64" not in kind:
        fail(f"{recipe}: {binary.name} is not an aarch64 executable: {kind.strip()}")
    # The ${S}/ files and units do_install:append names: scripts/check-srcrev.sh checks them at
    # SRCREV (it runs just before this in scripts/test.sh).

    # The licenses the recipe declares are those of what it links, from the vendored crates.
    lic_env = dict(env, CARGO_HOME=str(cargo_home))
    got = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-crates-inc.py"), "--print-licenses",
                          recipe, "--manifest-path", str(src / "Cargo.toml")],
                         env=lic_env, capture_output=True, text=True)
    if got.returncode != 0:
        fail(f"{recipe}: deriving licenses: {got.stderr.strip()}")
    want = (LAYER / recipe / f"{recipe}-licenses.inc").read_text()
    if got.stdout != want:
        fail(f"{recipe}-licenses.inc does not match the crates at SRCREV (run scripts/gen-crates-inc.py)")
    # What the package ships: OE's do_package strips executables this way (oe.package.runstrip).
    shipped = WORK / f"{package}.stripped"
    subprocess.run(["aarch64-linux-gnu-strip", "--remove-section=.comment", "--remove-section=.note",
                    "-o", str(shipped), str(binary)], check=True)
    size = binary.stat().st_size / 1e6
    print(f"{recipe}: shipped (stripped as OE strips) {shipped.stat().st_size / 1e6:.2f} MB: "
          f"{shipped.relative_to(ROOT)}")
    print(f"{recipe}: fetched and checked {len(crates)} crates, built {package} ({size:.1f} MB, "
          f"{' '.join(feature_args) or 'default features'}) with Rust {rust} in "
          f"{time.monotonic() - started:.0f} s; licenses match")


def check_static() -> None:
    for recipe in RECIPES:
        bb = (LAYER / recipe / f"{recipe}_0.1.0.bb").read_text()
        if "systemd_system_unitdir" in bb and not re.search(r'^REQUIRED_DISTRO_FEATURES = "[^"]*\bsystemd\b', bb, re.M):
            fail(f"{recipe}: installs systemd units but does not set REQUIRED_DISTRO_FEATURES = \"systemd\"")
        if "REQUIRED_DISTRO_FEATURES" in bb and not re.search(r"^inherit .*\bfeatures_check\b", bb, re.M):
            fail(f"{recipe}: REQUIRED_DISTRO_FEATURES without inherit features_check does nothing")
    default = " ".join(gen.recipe_vars("thingsly-agent")["PACKAGECONFIG"][0].split())
    for readme in (ROOT / "README.md", ROOT / "yocto-layer" / "meta-thingsly" / "README.md"):
        text = " ".join(readme.read_text().split())
        if f"`{default}`" not in text:
            fail(f"{readme.relative_to(ROOT)} does not give the agent's default PACKAGECONFIG `{default}`")


def main() -> int:
    argv = sys.argv[1:]
    for old in WORK.glob("vendor-*"):
        shutil.rmtree(old)
    srcrev = layer_var(LAYER / "include" / "thingsly-source.inc", "SRCREV")
    if "--srcrev" in argv:
        srcrev = argv[argv.index("--srcrev") + 1]
    release = "--debug-build" not in argv
    rust = layer_var(LAYER / "include" / "thingsly-rust.inc", "THINGSLY_RUST_MIN")
    check_static()
    if subprocess.run(["git", "cat-file", "-e", f"{srcrev}^{{commit}}"], cwd=ROOT).returncode != 0:
        fail(f"SRCREV {srcrev} is not a commit of this repository")
    src = WORK / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", srcrev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    recipes = RECIPES
    if "--only" in argv:
        recipes = [argv[argv.index("--only") + 1]]
        if recipes[0] not in RECIPES:
            fail(f"--only: one of {', '.join(RECIPES)}")
    for recipe in recipes:
        build_recipe(recipe, src, rust, release, WORK / "target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
