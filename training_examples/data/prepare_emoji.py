#!/usr/bin/env python
# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
"""Render iconify emoji sets into an ``imagefolder`` dataset for the embedded SnapGen demo model.

    python training_examples/data/prepare_emoji.py --output data/emoji                  # Fluent Emoji Flat (npm)
    python training_examples/data/prepare_emoji.py --output data/emoji128 --sets all --resolution 128   # five sets
    python training_examples/data/prepare_emoji.py --output data/emoji128 --pack .carry/emoji --resolution 128 \\
        --workers 16                                                                   # offline, from pack_emoji.py
    python training_examples/data/prepare_emoji.py --output data/tiny --iconify-json icons.json --limit 100

One set: captions are emoji names (``red apple``). Several sets: each image is captioned with its concept and its
style (``red apple, noto style``) and, in a second training row, with the concept alone. Output (written to
``OUTPUT.tmp`` and renamed when complete)::

    OUTPUT/train/<file>.png + metadata.jsonl   training images and captions
    OUTPUT/test/<file>.png  + metadata.jsonl   the held-out images
    OUTPUT/eval_prompts.json                   prompt sets for ``snapgen eval``
    OUTPUT/source.json                         packages, versions, licenses, attribution, counts, rules

Captions, the held-out splits and what is skipped follow :data:`RULES` / :data:`RULES_MULTI` (README.md here).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded by file path

from emoji_render import available_renderer, render  # noqa: E402
from emoji_sets import (  # noqa: E402
    DEFAULT_SET,
    NAMES_PACKAGE,
    SETS,
    Icon,
    IconSet,
    base_name,
    caption_of,
    concept_names,
    default_cache_dir,
    fetch_package,
    group_of,
    read_icon_set,
    read_json,
    read_unicode_names,
)

__all__ = ["Icon", "IconSet", "base_name", "caption_of", "group_of", "read_icon_set", "render"]

EXIT_USAGE = 2
PACK_MANIFEST = "manifest.json"
RULES = (
    "Every icon is rendered at --resolution squared, aspect kept, centred on white. Caption = the name with a "
    "skin-tone suffix (-light, -medium-light, -medium, -medium-dark, -dark) dropped when the name without it is "
    "also an icon (artist-dark -> artist; vertical-traffic-light is kept), hyphens -> spaces. The tone-stripped "
    "name is the icon's group; a group is held out (test split) when int(sha256(group)[:16 hex], 16) / 2**64 < "
    "--holdout-fraction, so all tones of an emoji share a split. Icons marked hidden are skipped; aliases are "
    "rendered only when they flip or rotate their parent."
)
RULES_MULTI = (
    "Every icon of every set is rendered at --resolution squared, aspect kept, centred on white. Icons of all sets "
    "that show one emoji share a concept (tone-free names equal, an alias, one code point in chars.json, or a "
    "run-together name matching a hyphenated or Unicode name); the concept is named after its icon in the first set "
    "of noto, twemoji, fluent-emoji-flat, emojione, fxemoji that has it. Training rows: every image twice, captioned "
    "'<concept>, <style> style' and '<concept>'. Held out (test split), with score(x) = int(sha256(x)[:16 hex], 16) "
    "/ 2**64: (b) heldout_concept: every image of a concept with score(concept) < --holdout-fraction; (a) "
    "heldout_pair: every image of a (concept, style) pair with score(concept|style) < --pair-fraction, of concepts "
    "drawn in two or more styles, keeping the pair of highest score in training when all would be held out. Icons "
    "marked hidden are skipped; aliases are rendered only when they flip or rotate their parent."
)


# --------------------------------------------------------------------------- the split


def holdout_score(key: str) -> float:
    """A stable number in [0, 1) from ``sha256(key)``; keys below a hold-out fraction are held out."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) / 2**64


def is_heldout(group: str, fraction: float) -> bool:
    return holdout_score(group) < fraction


def sample_score(key: str) -> float:
    """A second stable number in [0, 1), independent of the split: the order of ``--limit`` and of prompt lists."""
    return holdout_score("sample:" + key)


def heldout_pairs(styles_of: dict[str, set[str]], fraction: float) -> set[tuple[str, str]]:
    """``(concept, style)`` pairs held out as kind (a): score(concept|style) < ``fraction``, for concepts of two or
    more styles, one style always left in training (the one of highest score)."""
    held = set()
    for concept, styles in styles_of.items():
        if len(styles) < 2:
            continue
        scores = {style: holdout_score(f"{concept}|{style}") for style in styles}
        chosen = {style for style, score in scores.items() if score < fraction}
        if chosen == set(styles):
            chosen.discard(max(chosen, key=lambda s: (scores[s], s)))
        held |= {(concept, style) for style in chosen}
    return held


def plan(sets: list[IconSet], holdout_fraction: float = 0.05, pair_fraction: float = 0.05, limit: int | None = None,
         unicode_names: dict[str, str] | None = None) -> list[dict]:
    """One record per icon: icon, name, style, concept, text (caption), kind (``seen``, ``heldout_pair``,
    ``heldout_concept``), split, file_name. Splits are computed on all icons; ``limit`` then keeps the first
    ``limit`` icons in :func:`sample_score` order of their concepts (a sample independent of the split)."""
    multi = len(sets) > 1
    names = concept_names(sets, unicode_names)
    records = []
    for icon_set, concept_of in zip(sets, names):
        for icon in icon_set.icons:
            concept = concept_of[icon.name]
            text = f"{caption_of(concept)}, {icon_set.style} style" if multi else caption_of(concept)
            file_name = f"{icon_set.style}-{icon.name}.png" if multi else f"{icon.name}.png"
            records.append({"icon": icon, "name": icon.name, "style": icon_set.style, "concept": concept,
                            "group": concept, "text": text, "file_name": file_name})
    styles_of: dict[str, set[str]] = {}
    for r in records:
        styles_of.setdefault(r["concept"], set()).add(r["style"])
    pairs = heldout_pairs({c: s for c, s in styles_of.items() if not is_heldout(c, holdout_fraction)},
                          pair_fraction) if multi else set()
    for r in records:
        if is_heldout(r["concept"], holdout_fraction):
            r["kind"] = "heldout_concept"
        elif (r["concept"], r["style"]) in pairs:
            r["kind"] = "heldout_pair"
        else:
            r["kind"] = "seen"
        r["split"] = "train" if r["kind"] == "seen" else "test"
    if limit is not None:
        records = sorted(records, key=lambda r: (sample_score(r["concept"]), r["style"], r["name"]))[:limit]
    return sorted(records, key=lambda r: r["file_name"])


def eval_prompts(records: list[dict]) -> dict:
    """One set: ``{"heldout": held-out captions, "seen": as many training captions}``, sorted. Several sets:
    ``{"seen", "heldout_pair", "heldout_concept"}`` of styled prompts in :func:`sample_score` order (so a prefix is
    a fair sample): every held-out pair; one pair per held-out concept; as many seen pairs as the larger held-out
    list, one per concept."""
    if not any(r["text"] != caption_of(r["concept"]) for r in records):
        heldout = sorted({r["text"] for r in records if r["split"] == "test"})
        seen_groups = {r["text"]: r["group"] for r in records if r["split"] == "train"}
        seen = sorted(seen_groups, key=lambda t: (sample_score(seen_groups[t]), t))
        return {"heldout": heldout, "seen": sorted(seen[: len(heldout)])}
    texts = {(r["concept"], r["style"]): r["text"] for r in records}

    def one_per_concept(kind: str) -> list[str]:
        chosen: dict[str, tuple] = {}
        for r in records:
            if r["kind"] == kind:
                score = holdout_score(f"prompt:{r['concept']}|{r['style']}")
                if r["concept"] not in chosen or score < chosen[r["concept"]][0]:
                    chosen[r["concept"]] = (score, r["style"])
        return [texts[(c, chosen[c][1])] for c in sorted(chosen, key=lambda c: (sample_score(c), c))]

    pairs = sorted({(r["concept"], r["style"]) for r in records if r["kind"] == "heldout_pair"},
                   key=lambda p: (sample_score(f"{p[0]}|{p[1]}"), p))
    prompts = {"heldout_pair": [texts[p] for p in pairs], "heldout_concept": one_per_concept("heldout_concept")}
    seen = one_per_concept("seen")[: max(len(v) for v in prompts.values())]
    return {"seen": seen, **prompts}


def metadata_rows(records: list[dict], split: str) -> list[dict]:
    """``metadata.jsonl`` rows of ``split``. One set: ``file_name, text, name``. Several sets: also ``concept``,
    ``style`` and ``kind``, and every training image twice (styled caption, then the bare concept), so that the
    bare name is trained on every style (with cached text embeddings too: one caption per row)."""
    rows = []
    for r in records:
        if r["split"] != split:
            continue
        if r["text"] == caption_of(r["concept"]):
            rows.append({"file_name": r["file_name"], "text": r["text"], "name": r["name"]})
            continue
        row = {"file_name": r["file_name"], "text": r["text"], "name": r["name"],
               "concept": caption_of(r["concept"]), "style": r["style"], "kind": r["kind"]}
        rows.append(row)
        if split == "train":
            rows.append(dict(row, text=caption_of(r["concept"])))
    return rows


# --------------------------------------------------------------------------- provenance


def attribution(icon_set: IconSet, resolution: int) -> str:
    """One line naming the set, its author, license and what was changed (CC BY 4.0 asks for all three)."""
    info, author, license_ = icon_set.info, icon_set.info.get("author") or {}, icon_set.info.get("license") or {}
    package = f"{icon_set.package or icon_set.prefix}@{icon_set.version}" if icon_set.version else icon_set.prefix
    return (f"{info.get('name', icon_set.prefix)} by {author.get('name', 'unknown')} ({author.get('url', '')}), "
            f"{license_.get('title', license_.get('spdx', 'unknown license'))} ({license_.get('url', '')}); from "
            f"npm {package}, rendered to {resolution}x{resolution} PNG on white and recaptioned.")


def source_info(sets: list[IconSet], records: list[dict], settings: dict, unicode_names_source) -> dict:
    """``source.json``: one set keeps the original keys (package, version, license, ...); several sets list each."""
    count = {s: sum(r["split"] == s for r in records) for s in ("train", "test")}
    captions = {s: len({r["text"] for r in records if r["split"] == s}) for s in ("train", "test")}
    if len(sets) == 1:
        icon_set = sets[0]
        return {"package": icon_set.package or SETS.get(icon_set.prefix, SETS[DEFAULT_SET]).package,
                "version": icon_set.version, "name": icon_set.info.get("name"),
                "license": icon_set.info.get("license"), "author": icon_set.info.get("author"), **settings,
                "images": count, "captions": captions, "attribution": [attribution(icon_set, settings["resolution"])],
                "rules": RULES}
    kinds = ("seen", "heldout_pair", "heldout_concept")
    return {
        "sets": [{"key": s.prefix, "package": s.package, "version": s.version, "style": s.style,
                  "name": s.info.get("name"), "license": s.info.get("license"), "author": s.info.get("author"),
                  "images": sum(r["style"] == s.style for r in records)} for s in sets],
        "unicode_names": unicode_names_source, **settings,
        "images": count, "captions": captions,
        "images_by_kind": {k: sum(r["kind"] == k for r in records) for k in kinds},
        "concepts": {"all": len({r["concept"] for r in records}),
                     **{k: len({r["concept"] for r in records if r["kind"] == k}) for k in kinds}},
        "pairs": {k: len({(r["concept"], r["style"]) for r in records if r["kind"] == k}) for k in kinds},
        "attribution": [attribution(s, settings["resolution"]) for s in sets],
        "attribution_required": [attribution(s, settings["resolution"]) for s in sets
                                 if str((s.info.get("license") or {}).get("spdx", "")).startswith("CC-BY")],
        "rules": RULES_MULTI,
    }


# --------------------------------------------------------------------------- writing


def _render_to(job) -> str:
    icon, resolution, margin, renderer, path = job
    render(icon, resolution, margin, renderer).save(path, format="PNG", optimize=False)
    return icon.name


def _write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_prepare_args(resolution, holdout_fraction, pair_fraction, limit, margin, workers) -> None:
    for name, value in (("resolution", resolution), ("workers", workers), ("limit", limit)):
        if value is None and name == "limit":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` (--{name}) must be a whole number >= 1, got {value!r}.")
    for name, value, upper in (("holdout_fraction", holdout_fraction, 1.0), ("pair_fraction", pair_fraction, 1.0),
                               ("margin", margin, 0.5)):
        if not isinstance(value, (int, float)) or not 0 <= value < upper:
            raise ValueError(f"`{name}` (--{name.replace('_', '-')}) must be a number in [0, {upper}), got {value!r}.")


def prepare(icons_json, output: Path, resolution: int = 256, holdout_fraction: float = 0.05,
            limit: int | None = None, margin: float = 0.0, workers: int = 1, overwrite: bool = False,
            progress: bool = True, pair_fraction: float = 0.05, renderer: str = "auto", unicode_names=None) -> dict:
    """Render ``icons_json`` (one iconify ``icons.json`` or folder, or a list of them) into the ``output``
    imagefolder (see the module docstring); ``unicode_names``: emoji-datasource ``emoji.json`` / ``names.json`` that
    helps match run-together names. Returns ``source.json``."""
    from tqdm.auto import tqdm

    _check_prepare_args(resolution, holdout_fraction, pair_fraction, limit, margin, workers)
    renderer = available_renderer(renderer)
    output = Path(output)
    if output.exists() and not overwrite:
        raise ValueError(f"--output: {str(output)!r} already exists; pass --overwrite or choose another folder.")
    paths = list(icons_json) if isinstance(icons_json, (list, tuple)) else [icons_json]
    sets = [read_icon_set(path) for path in paths]
    if len({s.style for s in sets}) != len(sets):
        raise ValueError(f"--iconify-json: two sets have one style name ({[s.style for s in sets]}); pass each once.")
    order = list(SETS)
    sets.sort(key=lambda s: order.index(s.prefix) if s.prefix in order else len(order))
    table = read_unicode_names(unicode_names) if unicode_names is not None and len(sets) > 1 else None
    records = plan(sets, holdout_fraction, pair_fraction, limit, table)
    if not records:
        raise ValueError(f"--iconify-json: {[str(p) for p in paths]} hold no renderable icon.")
    staging = output.with_name(output.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    splits = [split for split in ("train", "test") if any(r["split"] == split for r in records)]
    for split in splits:  # an empty split gets no folder: datasets' imagefolder rejects empty splits
        (staging / split).mkdir(parents=True)
    jobs = [(r["icon"], resolution, margin, renderer, staging / r["split"] / r["file_name"]) for r in records]
    bar = tqdm(total=len(jobs), desc=f"rendering ({renderer})", unit="icon", disable=not progress, file=sys.stderr,
               mininterval=1.0 if sys.stderr.isatty() else 10.0)
    try:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(_render_to, jobs, chunksize=32):
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
        (staging / split / "metadata.jsonl").write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in metadata_rows(records, split)),
            encoding="utf-8")
    _write_json(staging / "eval_prompts.json", eval_prompts(records))
    settings = {"renderer": renderer, "resolution": resolution, "margin": margin,
                "holdout_fraction": holdout_fraction, "limit": limit}
    if len(sets) > 1:
        settings["pair_fraction"] = pair_fraction
    names_source = None
    if table is not None:
        names_source = {"package": NAMES_PACKAGE.package, "version": NAMES_PACKAGE.version, "license": "MIT",
                        "use": "Unicode names and short names matching run-together icon names to code points"}
    source = source_info(sets, records, settings, names_source)
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


def resolve_sources(args) -> tuple[list[Path], Path | None]:
    """Set folders / icons.json files and the Unicode-names file from ``--iconify-json``, ``--pack`` or ``--sets``
    (fetched with npm into the cache)."""
    keys = list(SETS) if args.sets == ["all"] else (args.sets or None)
    unknown = [k for k in keys or [] if k not in SETS]
    if unknown:
        raise ValueError(f"--sets: unknown set {unknown[0]!r}; choose from all, {', '.join(SETS)}.")
    if args.iconify_json is not None:
        if args.pack is not None or keys:
            raise ValueError("--iconify-json reads local files: leave out --pack and --sets.")
        for path in args.iconify_json:
            if not Path(path).exists():
                raise ValueError(f"--iconify-json: {path!r} is not a file or folder.")
        return [Path(p) for p in args.iconify_json], Path(args.unicode_names) if args.unicode_names else None
    if args.pack is not None:
        pack = Path(args.pack)
        if not (pack / PACK_MANIFEST).is_file():
            raise ValueError(f"--pack: {args.pack!r} has no {PACK_MANIFEST}; make it with pack_emoji.py.")
        manifest = read_json(pack / PACK_MANIFEST)
        chosen = keys or manifest["sets"]
        missing = [k for k in chosen if k not in manifest["sets"]]
        if missing:
            raise ValueError(f"--sets: {missing} not in the pack (it has {manifest['sets']}).")
        names = pack / manifest["unicode_names"] if manifest.get("unicode_names") else None
        return [pack / key for key in chosen], Path(args.unicode_names) if args.unicode_names else names
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    keys = keys or [DEFAULT_SET]
    folders = [fetch_package(cache, SETS[key]) for key in keys]
    names = args.unicode_names
    if names is None and len(keys) > 1:
        names = fetch_package(cache, NAMES_PACKAGE, members=("emoji.json", "package.json")) / "emoji.json"
    return folders, Path(names) if names else None


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
    parser.add_argument("--iconify-json", nargs="+", default=None, metavar="PATH",
                        help="local iconify icons.json files or set folders (default: fetch --sets from npm)")
    parser.add_argument("--pack", default=None, help="offline bundle written by pack_emoji.py (all its sets)")
    parser.add_argument("--sets", nargs="+", default=None, metavar="SET",
                        help=f"sets to fetch with npm (or to take from --pack): all, {', '.join(SETS)} "
                             f"(default {DEFAULT_SET})")
    parser.add_argument("--unicode-names", default=None,
                        help="emoji-datasource emoji.json for run-together names (fetched with --sets, in a --pack)")
    parser.add_argument("--cache-dir", default=None,
                        help="where npm packages are kept (default: $XDG_CACHE_HOME or ~/.cache /diffusers-snapgen)")
    parser.add_argument("--resolution", type=_positive_int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--margin", type=_fraction(0.5), default=0.0, help="white border, fraction of the side")
    parser.add_argument("--holdout-fraction", type=_fraction(1.0), default=0.05,
                        help="share of concepts held out in every style (default 0.05)")
    parser.add_argument("--pair-fraction", type=_fraction(1.0), default=0.05,
                        help="several sets: share of (concept, style) pairs held out (default 0.05)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="render only this many icons (quick runs)")
    parser.add_argument("--workers", type=_positive_int, default=1, help="rendering processes (default 1)")
    parser.add_argument("--renderer", choices=("auto", "resvg", "cairosvg"), default="auto",
                        help="SVG renderer (default auto: resvg-py when installed, else cairosvg)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        sources, unicode_names = resolve_sources(args)
        source = prepare(sources, Path(args.output), args.resolution, args.holdout_fraction, args.limit,
                         args.margin, args.workers, args.overwrite, progress=not args.quiet,
                         pair_fraction=args.pair_fraction, renderer=args.renderer, unicode_names=unicode_names)
    except (ValueError, TypeError, OSError) as e:
        print(f"prepare_emoji.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    prompts = read_json(Path(args.output) / "eval_prompts.json")
    print(f"{args.output}: {source['images']['train']} train + {source['images']['test']} test images, "
          + ", ".join(f"{len(v)} {k} prompts" for k, v in prompts.items()), file=sys.stderr)
    if not source["images"]["test"] or not source["images"]["train"]:
        print("prepare_emoji.py: warning: a split is empty (no folder written for it); raise --limit or change "
              "--holdout-fraction", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
