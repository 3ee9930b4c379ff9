#!/usr/bin/env python
# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
"""Render the Fluent Emoji Flat set (npm ``@iconify-json/fluent-emoji-flat``, MIT, Microsoft) into an ``imagefolder``
dataset for the embedded SnapGen demo model (issue 7).

    python training_examples/data/prepare_emoji.py --output data/emoji            # fetches the npm package
    python training_examples/data/prepare_emoji.py --output data/emoji --iconify-json icons.json --limit 100

Output (written to ``OUTPUT.tmp`` and renamed when complete)::

    OUTPUT/train/<name>.png + metadata.jsonl   {"file_name": "red-apple.png", "text": "red apple", "name": "red-apple"}
    OUTPUT/test/<name>.png  + metadata.jsonl   the fixed held-out split
    OUTPUT/eval_prompts.json                   {"heldout": [...], "seen": [...]}: evaluation prompts
    OUTPUT/source.json                         package, version, license, author, counts, rules

Captions, the held-out split and what is skipped follow :data:`RULES` (also in README.md here).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "@iconify-json/fluent-emoji-flat"
VERSION = "1.2.6"
TONE_SUFFIXES = ("medium-light", "medium-dark", "light", "dark", "medium")  # longest first
NAME_PATTERN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
EXIT_USAGE = 2
RULES = (
    "Every icon is rendered at --resolution squared, aspect kept, centred on white. Caption = the name with a "
    "skin-tone suffix (-light, -medium-light, -medium, -medium-dark, -dark) dropped when the name without it is "
    "also an icon (artist-dark -> artist; vertical-traffic-light is kept), hyphens -> spaces. The tone-stripped "
    "name is the icon's group; a group is held out (test split) when int(sha256(group)[:16 hex], 16) / 2**64 < "
    "--holdout-fraction, so all tones of an emoji share a split. Icons marked hidden are skipped; aliases are "
    "rendered only when they flip or rotate their parent."
)


@dataclass(frozen=True)
class Icon:
    """One image to render: SVG body, view box and the transformation iconify applies."""

    name: str
    body: str
    left: float
    top: float
    width: float
    height: float
    h_flip: bool = False
    v_flip: bool = False
    rotate: int = 0  # quarter turns clockwise


# --------------------------------------------------------------------------- names, captions, split


def group_of(name: str, names) -> str:
    """``name`` without a skin-tone suffix when that shorter name is also in ``names``, else ``name``."""
    for suffix in TONE_SUFFIXES:
        if name.endswith("-" + suffix):
            base = name[: -len(suffix) - 1]
            if base in names:
                return base
    return name


def caption_of(group: str) -> str:
    """``red-apple`` -> ``red apple``."""
    return group.replace("-", " ")


def holdout_score(group: str) -> float:
    """A stable number in [0, 1) from ``sha256(group)``; groups below the hold-out fraction are held out."""
    return int(hashlib.sha256(group.encode("utf-8")).hexdigest()[:16], 16) / 2**64


def is_heldout(group: str, fraction: float) -> bool:
    return holdout_score(group) < fraction


def sample_score(group: str) -> float:
    """A second stable number in [0, 1), independent of the split: the order of ``--limit`` and of seen prompts."""
    return holdout_score("sample:" + group)


# --------------------------------------------------------------------------- reading the icon set


def read_icon_set(path: Path) -> tuple[list[Icon], dict]:
    """Icons to render from an iconify ``icons.json`` (hidden icons and pure-rename aliases skipped) and the set's
    ``info.json`` next to it (``{}`` when absent)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--iconify-json: cannot read {str(path)!r} as JSON ({e}).") from e
    if not isinstance(data, dict) or not isinstance(data.get("icons"), dict):
        raise ValueError(f"--iconify-json: {str(path)!r} is not an iconify icon set (no `icons` object).")
    default = {k: data.get(k, d) for k, d in (("left", 0), ("top", 0), ("width", 16), ("height", 16))}
    icons, aliases = data["icons"], data.get("aliases") or {}

    def resolve(name: str, seen: tuple = ()) -> dict | None:
        if name in icons:
            return dict(default, **icons[name])
        alias = aliases.get(name)
        if alias is None or name in seen or "parent" not in alias:
            return None
        parent = resolve(alias["parent"], seen + (name,))
        if parent is None:
            return None
        merged = dict(parent, **{k: v for k, v in alias.items() if k not in ("parent", "hFlip", "vFlip", "rotate")})
        merged["hFlip"] = bool(parent.get("hFlip")) ^ bool(alias.get("hFlip"))
        merged["vFlip"] = bool(parent.get("vFlip")) ^ bool(alias.get("vFlip"))
        merged["rotate"] = (int(parent.get("rotate", 0)) + int(alias.get("rotate", 0))) % 4
        return merged

    wanted = [n for n, v in icons.items() if not v.get("hidden")]
    wanted += [n for n, a in aliases.items()
               if any(a.get(k) for k in ("hFlip", "vFlip", "rotate")) and not a.get("hidden")]
    result = []
    for name in sorted(set(wanted)):
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"--iconify-json: icon name {name!r} is not lowercase-hyphenated; cannot name a file.")
        entry = resolve(name)
        if entry is None or not isinstance(entry.get("body"), str):
            continue
        result.append(Icon(name, entry["body"], float(entry["left"]), float(entry["top"]), float(entry["width"]),
                           float(entry["height"]), bool(entry.get("hFlip")), bool(entry.get("vFlip")),
                           int(entry.get("rotate", 0)) % 4))
    info_path = Path(path).with_name("info.json")
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    return result, info


def fetch_package(cache_dir: Path, version: str = VERSION) -> Path:
    """``icons.json`` of the npm package, fetched once with ``npm pack`` into ``cache_dir``."""
    target = cache_dir / f"fluent-emoji-flat-{version}"
    if (target / "icons.json").is_file():
        return target / "icons.json"
    if shutil.which("npm") is None:
        raise ValueError("npm is not installed: install Node.js/npm, or pass --iconify-json with a local icons.json.")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        print(f"fetching {PACKAGE}@{version} with npm pack ...", file=sys.stderr)
        done = subprocess.run(["npm", "pack", f"{PACKAGE}@{version}", "--pack-destination", tmp],
                              check=False, capture_output=True, text=True)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            raise OSError(f"npm pack {PACKAGE}@{version} failed: {' '.join(done.stderr.split())[-300:]}")
        staging = Path(tmp) / "package"
        staging.mkdir()
        with tarfile.open(tarballs[0]) as archive:
            for member in ("icons.json", "info.json", "package.json"):
                data = archive.extractfile(f"package/{member}")
                (staging / member).write_bytes(data.read())
        os.replace(staging, target)
    return target / "icons.json"


# --------------------------------------------------------------------------- rendering


def render(icon: Icon, resolution: int, margin: float = 0.0):
    """The icon as an RGB ``PIL.Image`` of ``resolution`` squared, aspect kept, centred on white."""
    import cairosvg
    from PIL import Image

    inner = max(1, round(resolution * (1 - 2 * margin)))
    scale = inner / max(icon.width, icon.height)
    w, h = max(1, round(icon.width * scale)), max(1, round(icon.height * scale))
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="{w}" '
           f'height="{h}" viewBox="{icon.left:g} {icon.top:g} {icon.width:g} {icon.height:g}">{icon.body}</svg>')
    rgba = Image.open(io.BytesIO(cairosvg.svg2png(bytestring=svg.encode("utf-8")))).convert("RGBA")
    if icon.h_flip:
        rgba = rgba.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if icon.v_flip:
        rgba = rgba.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if icon.rotate:
        rgba = rgba.rotate(-90 * icon.rotate, expand=True)
    canvas = Image.new("RGBA", (resolution, resolution), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((resolution - rgba.width) // 2, (resolution - rgba.height) // 2))
    return canvas.convert("RGB")


def _render_to(job) -> str:
    icon, resolution, margin, path = job
    render(icon, resolution, margin).save(path, format="PNG", optimize=False)
    return icon.name


# --------------------------------------------------------------------------- the dataset


def plan(icons: list[Icon], holdout_fraction: float, limit: int | None = None) -> list[dict]:
    """One record per icon: name, group, caption, split. With ``limit``, the first ``limit`` icons in
    :func:`sample_score` order of their groups (a deterministic sample, independent of the split)."""
    names = {icon.name for icon in icons}
    records = []
    for icon in icons:
        group = group_of(icon.name, names)
        split = "test" if is_heldout(group, holdout_fraction) else "train"
        records.append({"icon": icon, "name": icon.name, "group": group, "text": caption_of(group), "split": split})
    if limit is not None:
        records = sorted(records, key=lambda r: (sample_score(r["group"]), r["name"]))[:limit]
    return sorted(records, key=lambda r: r["name"])


def eval_prompts(records: list[dict]) -> dict:
    """Held-out captions and as many seen (training) captions, the latter the first in :func:`sample_score` order."""
    heldout = sorted({r["text"] for r in records if r["split"] == "test"})
    seen_groups = {r["text"]: r["group"] for r in records if r["split"] == "train"}
    seen = sorted(seen_groups, key=lambda t: (sample_score(seen_groups[t]), t))
    return {"heldout": heldout, "seen": sorted(seen[: len(heldout)])}


def _write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_prepare_args(resolution, holdout_fraction, limit, margin, workers) -> None:
    for name, value in (("resolution", resolution), ("workers", workers), ("limit", limit)):
        if value is None and name == "limit":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` (--{name}) must be a whole number >= 1, got {value!r}.")
    for name, value, upper in (("holdout_fraction", holdout_fraction, 1.0), ("margin", margin, 0.5)):
        if not isinstance(value, (int, float)) or not 0 <= value < upper:
            raise ValueError(f"`{name}` (--{name.replace('_', '-')}) must be a number in [0, {upper}), got {value!r}.")


def prepare(icons_json: Path, output: Path, resolution: int = 256, holdout_fraction: float = 0.05,
            limit: int | None = None, margin: float = 0.0, workers: int = 1, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Render ``icons_json`` into the ``output`` imagefolder (see the module docstring); returns ``source.json``."""
    from tqdm.auto import tqdm

    _check_prepare_args(resolution, holdout_fraction, limit, margin, workers)
    output = Path(output)
    if output.exists() and not overwrite:
        raise ValueError(f"--output: {str(output)!r} already exists; pass --overwrite or choose another folder.")
    icons, info = read_icon_set(icons_json)
    records = plan(icons, holdout_fraction, limit)
    if not records:
        raise ValueError(f"--iconify-json: {str(icons_json)!r} holds no renderable icon.")
    staging = output.with_name(output.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    splits = [split for split in ("train", "test") if any(r["split"] == split for r in records)]
    for split in splits:  # an empty split gets no folder: datasets' imagefolder rejects empty splits
        (staging / split).mkdir(parents=True)
    jobs = [(r["icon"], resolution, margin, staging / r["split"] / f"{r['name']}.png") for r in records]
    bar = tqdm(total=len(jobs), desc="rendering", unit="icon", disable=not progress, file=sys.stderr,
               mininterval=1.0 if sys.stderr.isatty() else 10.0)
    try:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(_render_to, jobs, chunksize=16):
                    bar.update()
        else:
            for job in jobs:
                _render_to(job)
                bar.update()
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ValueError(f"--iconify-json: rendering failed ({' '.join(str(e).split())[:300]}).") from e
    finally:
        bar.close()
    for split in splits:
        rows = [{"file_name": f"{r['name']}.png", "text": r["text"], "name": r["name"]}
                for r in records if r["split"] == split]
        (staging / split / "metadata.jsonl").write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    prompts = eval_prompts(records)
    _write_json(staging / "eval_prompts.json", prompts)
    package_json = Path(icons_json).with_name("package.json")
    version = json.loads(package_json.read_text(encoding="utf-8")).get("version") if package_json.is_file() else None
    source = {
        "package": PACKAGE, "version": version, "name": info.get("name"),
        "license": info.get("license"), "author": info.get("author"), "resolution": resolution, "margin": margin,
        "holdout_fraction": holdout_fraction, "limit": limit,
        "images": {s: sum(r["split"] == s for r in records) for s in ("train", "test")},
        "captions": {s: len({r["text"] for r in records if r["split"] == s}) for s in ("train", "test")},
        "rules": RULES,
    }
    _write_json(staging / "source.json", source)
    if output.exists():
        old = output.with_name(output.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old)
    else:
        os.replace(staging, output)
    return source


# --------------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(upper: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not 0 <= value < upper:
            raise argparse.ArgumentTypeError(f"must be in [0, {upper}), got {text}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prepare_emoji.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", "-o", required=True, help="dataset folder to create")
    parser.add_argument("--iconify-json", default=None, help="local icons.json (default: fetch the npm package)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the npm package is kept (default: $XDG_CACHE_HOME or ~/.cache /diffusers-snapgen)")
    parser.add_argument("--resolution", type=_positive_int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--margin", type=_fraction(0.5), default=0.0, help="white border, fraction of the side")
    parser.add_argument("--holdout-fraction", type=_fraction(1.0), default=0.05,
                        help="share of caption groups held out for evaluation (default 0.05)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="render only this many icons (quick runs)")
    parser.add_argument("--workers", type=_positive_int, default=1, help="rendering processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.iconify_json is not None:
            icons_json = Path(args.iconify_json)
            if not icons_json.is_file():
                raise ValueError(f"--iconify-json: {args.iconify_json!r} is not a file.")
        else:
            default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffusers-snapgen"
            icons_json = fetch_package(Path(args.cache_dir) if args.cache_dir else default_cache)
        source = prepare(icons_json, Path(args.output), args.resolution, args.holdout_fraction, args.limit,
                         args.margin, args.workers, args.overwrite, progress=not args.quiet)
    except (ValueError, TypeError, OSError) as e:
        print(f"prepare_emoji.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.output}: {source['images']['train']} train + {source['images']['test']} test images, "
          f"{source['captions']['test']} held-out prompts", file=sys.stderr)
    if not source["images"]["test"] or not source["images"]["train"]:
        print("prepare_emoji.py: warning: a split is empty (no folder written for it); raise --limit or change "
              "--holdout-fraction", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
