#!/usr/bin/env python
# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
"""Bundle the emoji sets for a machine without internet: ``prepare_emoji.py --pack`` renders the dataset from it.

    python training_examples/data/pack_emoji.py --output .carry/emoji          # npm pack (cached) + pip download

Writes (through ``OUTPUT.tmp``)::

    OUTPUT/<set>/icons.json.xz, chars.json.xz, info.json, package.json   each iconify set, as npm ships it
    OUTPUT/emoji-datasource/names.json.xz, package.json                  Unicode names and short names (MIT)
    OUTPUT/wheels/resvg_py-*.whl                                          the renderer (manylinux x86-64, abi3)
    OUTPUT/manifest.json                                                  sets, files, bytes, sha256

Then, on the training machine: ``pip install --no-index --no-deps OUTPUT/wheels/*.whl`` and
``prepare_emoji.py --pack OUTPUT --output data/emoji128 --resolution 128 --workers 16``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from emoji_sets import NAMES_PACKAGE, SETS, default_cache_dir, fetch_package  # noqa: E402

EXIT_USAGE = 2
RENDERER_WHEEL = "resvg-py==0.5.0"
WHEEL_TARGET = ("--platform", "manylinux2014_x86_64", "--python-version", "3.12", "--implementation", "cp")


def _compress(source: Path, target: Path) -> None:
    with lzma.open(target, "wb", preset=9) as f:
        f.write(source.read_bytes())


def _download_wheel(target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           *WHEEL_TARGET, "-d", str(target), RENDERER_WHEEL], capture_output=True, text=True)
    wheels = list(target.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise OSError(f"pip download {RENDERER_WHEEL} failed: {' '.join(done.stderr.split())[-300:]}")
    return wheels[0]


def pack(output: Path, keys: list[str], cache_dir: Path, wheel: bool = True, overwrite: bool = False) -> dict:
    """Write the bundle (see the module docstring); returns the manifest."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise ValueError(f"--output: {str(output)!r} already exists; pass --overwrite or choose another folder.")
    staging = output.with_name(output.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for key in keys:
        source = fetch_package(cache_dir, SETS[key])
        folder = staging / key
        folder.mkdir()
        for name in ("icons.json", "chars.json"):
            if (source / name).is_file():
                _compress(source / name, folder / f"{name}.xz")
        for name in ("info.json", "package.json"):
            shutil.copyfile(source / name, folder / name)
    source = fetch_package(cache_dir, NAMES_PACKAGE, members=("emoji.json", "package.json"))
    entries = json.loads((source / "emoji.json").read_text(encoding="utf-8"))
    reduced = [{k: e.get(k) for k in ("name", "unified", "short_names")} for e in entries]
    (staging / NAMES_PACKAGE.key).mkdir()
    with lzma.open(staging / NAMES_PACKAGE.key / "names.json.xz", "wt", encoding="utf-8", preset=9) as f:
        json.dump(reduced, f, separators=(",", ":"))
    shutil.copyfile(source / "package.json", staging / NAMES_PACKAGE.key / "package.json")
    if wheel:
        _download_wheel(staging / "wheels")
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        data = path.read_bytes()
        files[path.relative_to(staging).as_posix()] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"sets": keys, "versions": {k: SETS[k].version for k in keys},
                "unicode_names": f"{NAMES_PACKAGE.key}/names.json", "renderer_wheel": RENDERER_WHEEL if wheel else None,
                "bytes": sum(f["bytes"] for f in files.values()), "files": files}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if output.exists():
        shutil.rmtree(output)
    os.replace(staging, output)
    return manifest


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(f"{message} (see --help)")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="pack_emoji.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", "-o", required=True, help="bundle folder to create (e.g. .carry/emoji)")
    parser.add_argument("--sets", nargs="+", default=["all"], metavar="SET", help=f"all (default) or {', '.join(SETS)}")
    parser.add_argument("--cache-dir", default=None, help="npm package cache (default ~/.cache/diffusers-snapgen)")
    parser.add_argument("--no-wheel", action="store_true", help="leave the resvg-py wheel out")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    try:
        args = parser.parse_args(argv)
        keys = list(SETS) if args.sets == ["all"] else args.sets
        unknown = [k for k in keys if k not in SETS]
        if unknown:
            raise ValueError(f"--sets: unknown set {unknown[0]!r}; choose from all, {', '.join(SETS)}.")
        manifest = pack(Path(args.output), keys, Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
                        wheel=not args.no_wheel, overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        print(f"pack_emoji.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.output}: {len(manifest['files'])} files, {manifest['bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
