# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
"""Iconify emoji sets: the packages the demo data uses, reading them (plain or ``.xz``), fetching them with ``npm pack``
and naming their icons consistently across sets (one *concept* per emoji, whichever set drew it).

Used by ``prepare_emoji.py`` (rendering) and ``pack_emoji.py`` (the offline bundle). Rules: README.md next to this file.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

NAME_PATTERN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
TONE_SUFFIXES = ("medium-light", "medium-dark", "light", "dark", "medium")  # Fluent's, longest first
SKIN_TONE = re.compile(r"-(?:medium-light|medium-dark|light|medium|dark)-skin-tone")  # CLDR's, anywhere in a name
TONE_CODEPOINTS = {"fe0f", "1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}  # variation selector + skin-tone modifiers
SET_FILES = ("icons.json", "info.json", "chars.json", "package.json")


@dataclass(frozen=True)
class SetSpec:
    """An npm package of the registry below; ``style`` is the word captions use (``"red apple, noto style"``)."""

    key: str
    package: str
    version: str
    style: str


#: The sets of the multi-style demo data, in naming priority (a concept is named after its icon in the first set
#: that has it; Noto and Twemoji follow the Unicode CLDR names). CC-BY-SA sets (OpenMoji) are left out on purpose.
SETS = {
    spec.key: spec
    for spec in (
        SetSpec("noto", "@iconify-json/noto", "1.2.9", "noto"),
        SetSpec("twemoji", "@iconify-json/twemoji", "1.2.5", "twemoji"),
        SetSpec("fluent-emoji-flat", "@iconify-json/fluent-emoji-flat", "1.2.6", "fluent"),
        SetSpec("emojione", "@iconify-json/emojione", "1.2.3", "emojione"),
        SetSpec("fxemoji", "@iconify-json/fxemoji", "1.2.2", "fxemoji"),
    )
}
DEFAULT_SET = "fluent-emoji-flat"  # the single-set default (the original demo data)
#: Unicode names, short names and code points: matches run-together names (fxemoji's ``smirk``) to code points.
NAMES_PACKAGE = SetSpec("emoji-datasource", "emoji-datasource", "16.0.0", "")


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


@dataclass
class IconSet:
    """A read icon set: icons to render, pure-rename aliases (``alias -> parent``), ``chars.json`` (code point ->
    name), ``info.json`` and the package version."""

    prefix: str
    icons: list[Icon]
    renames: dict[str, str] = field(default_factory=dict)
    chars: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    version: str | None = None
    package: str | None = None

    @property
    def style(self) -> str:
        spec = SETS.get(self.prefix)
        return spec.style if spec is not None else self.prefix

    @property
    def all_names(self) -> set[str]:
        return {icon.name for icon in self.icons} | set(self.renames)


# --------------------------------------------------------------------------- reading


def read_json(path: Path):
    """JSON from ``path`` or, when only ``path.xz`` exists, from the xz-compressed file."""
    path = Path(path)
    if not path.is_file() and Path(str(path) + ".xz").is_file():
        with lzma.open(str(path) + ".xz", "rt", encoding="utf-8") as f:
            return json.load(f)
    return json.loads(path.read_text(encoding="utf-8"))


def _exists(path: Path) -> bool:
    return path.is_file() or Path(str(path) + ".xz").is_file()


def read_icon_set(path) -> IconSet:
    """Icons to render from an iconify ``icons.json`` (or ``icons.json.xz``, or a folder holding one): hidden icons
    skipped, pure-rename aliases kept as :attr:`IconSet.renames`, aliases that flip or rotate rendered. ``info.json``,
    ``chars.json`` and ``package.json`` next to it are read when present."""
    path = Path(path)
    if path.is_dir() or path.name not in ("icons.json", "icons.json.xz") and not path.suffix == ".json":
        path = path / "icons.json"
    if path.suffix == ".xz":
        path = path.with_suffix("")
    try:
        data = read_json(path)
    except (OSError, json.JSONDecodeError, lzma.LZMAError) as e:
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

    def transforms(alias: dict) -> bool:
        return any(alias.get(k) for k in ("hFlip", "vFlip", "rotate"))

    wanted = [n for n, v in icons.items() if not v.get("hidden")]
    wanted += [n for n, a in aliases.items() if transforms(a) and not a.get("hidden")]
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
    renames = {n: a["parent"] for n, a in aliases.items() if "parent" in a and not transforms(a)}
    folder = path.parent
    info = read_json(folder / "info.json") if _exists(folder / "info.json") else {}
    chars = read_json(folder / "chars.json") if _exists(folder / "chars.json") else {}
    package = read_json(folder / "package.json") if _exists(folder / "package.json") else {}
    prefix = data.get("prefix") or folder.name
    return IconSet(prefix, result, renames, chars if isinstance(chars, dict) else {}, info, package.get("version"),
                   package.get("name"))


def read_unicode_names(path) -> dict[str, str]:
    """``{run-together name: code point key}`` from emoji-datasource's ``emoji.json`` (Unicode name and short names,
    lowercase, letters and digits only), or from the reduced ``names.json`` that ``pack_emoji.py`` writes."""
    entries = read_json(Path(path))
    table = {}
    for entry in entries:
        key = codepoint_key(entry["unified"])
        if key is None:
            continue
        for text in [entry.get("name") or ""] + list(entry.get("short_names") or []):
            joined = re.sub("[^a-z0-9]", "", text.lower())
            if joined:
                table.setdefault(joined, key)
    return table


# --------------------------------------------------------------------------- fetching (never on the training machine)


def _npm_pack(spec: str, destination: Path) -> Path:
    if shutil.which("npm") is None:
        raise ValueError("npm is not installed: install Node.js/npm, or pass --iconify-json / --pack with local files.")
    print(f"fetching {spec} with npm pack ...", file=sys.stderr)
    done = subprocess.run(["npm", "pack", spec, "--pack-destination", str(destination)], check=False,
                          capture_output=True, text=True)
    tarballs = list(destination.glob("*.tgz"))
    if done.returncode != 0 or len(tarballs) != 1:
        raise OSError(f"npm pack {spec} failed: {' '.join(done.stderr.split())[-300:]}")
    return tarballs[0]


def fetch_package(cache_dir: Path, spec: SetSpec, members=SET_FILES) -> Path:
    """The folder ``cache_dir/<key>-<version>`` holding ``members`` of the npm package (those it has), fetched once
    with ``npm pack``."""
    target = Path(cache_dir) / f"{spec.key}-{spec.version}"
    if (target / "package.json").is_file():
        return target
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        tarball = _npm_pack(f"{spec.package}@{spec.version}", Path(tmp))
        staging = Path(tmp) / "package"
        staging.mkdir()
        with tarfile.open(tarball) as archive:
            names = set(archive.getnames())
            for member in members:
                if f"package/{member}" in names:
                    (staging / member).write_bytes(archive.extractfile(f"package/{member}").read())
        os.replace(staging, target)
    return target


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffusers-snapgen"


# --------------------------------------------------------------------------- names and concepts


def group_of(name: str, names) -> str:
    """``name`` without a Fluent skin-tone suffix when that shorter name is also in ``names``, else ``name``."""
    for suffix in TONE_SUFFIXES:
        if name.endswith("-" + suffix):
            base = name[: -len(suffix) - 1]
            if base in names:
                return base
    return name


def base_name(name: str, names) -> str:
    """``name`` without skin tones: CLDR's ``-<tone>-skin-tone`` anywhere (``man-dark-skin-tone-beard`` ->
    ``man-beard``), then a Fluent suffix as :func:`group_of`; EmojiOne's ``flag-for-peru`` -> ``flag-peru`` (and
    ``flag-for-white-flag`` -> ``white-flag``)."""
    stripped = SKIN_TONE.sub("", name)
    base = group_of(stripped, names | {stripped}) if stripped != name else group_of(name, names)
    if base.startswith("flag-for-"):
        base = base[len("flag-for-"):] if base.endswith("-flag") else "flag-" + base[len("flag-for-"):]
    return base


def caption_of(group: str) -> str:
    """``red-apple`` -> ``red apple``."""
    return group.replace("-", " ")


def codepoint_key(codepoints: str) -> str | None:
    """``1F385-1F3FB`` -> ``1f385``: lowercase, without variation selectors and skin-tone modifiers."""
    parts = [p for p in codepoints.lower().split("-") if p and p not in TONE_CODEPOINTS]
    return "-".join(parts) or None


class _Components:
    """Union-find over name and code-point keys that never joins two different icons of one set."""

    def __init__(self):
        self.parent: dict = {}
        self.members: dict = {}  # root -> {(set index, base name)}

    def find(self, key):
        if key not in self.parent:
            self.parent[key], self.members[key] = key, set()
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def add(self, key, member) -> None:
        self.members[self.find(key)].add(member)

    def union(self, a, b) -> bool:
        a, b = self.find(a), self.find(b)
        if a == b:
            return True
        by_set_a, by_set_b = defaultdict(set), defaultdict(set)
        for index, name in self.members[a]:
            by_set_a[index].add(name)
        for index, name in self.members[b]:
            by_set_b[index].add(name)
        if any(by_set_a[i] != by_set_b[i] for i in set(by_set_a) & set(by_set_b)):
            return False  # an alias or code point that would merge two distinct icons of one set
        self.parent[b] = a
        self.members[a] |= self.members.pop(b)
        return True


def segment(text: str, vocabulary: set[str]) -> list[str] | None:
    """Split a run-together name into two or more words: known words of ``vocabulary`` with two or more letters,
    digits, and at most one unknown chunk of four or more letters, then every known word needing three letters
    (``pinkwallet`` -> ``pink wallet``, but ``index`` is not ``in dex``). The best split has the fewest unknown
    chunks, then the most letters in known words, then the fewest words; None when there is no split."""
    # best[i][(unknown chunks, has a two-letter word)] = ((unknown, -known letters, words), words) for text[:i]
    best: list[dict] = [{(0, False): ((0, 0, 0), [])}] + [{} for _ in text]
    for end in range(1, len(text) + 1):
        for start in range(max(0, end - 30), end):
            word = text[start:end]
            known = word.isdigit() or len(word) >= 2 and word in vocabulary
            if not known and not (len(word) >= 4 and len(word) < len(text)):
                continue
            for (unknown, short), ((_, letters, count), words) in best[start].items():
                state = (unknown, short or (len(word) < 3 and not word.isdigit())) if known else (unknown + 1, short)
                if state[0] > 1 or state[0] and state[1]:
                    continue
                cost = (state[0], letters - (len(word) if known else 0), count + 1)
                if state not in best[end] or cost < best[end][state][0]:
                    best[end][state] = (cost, words + [word])
    splits = sorted(best[-1].values(), key=lambda split: split[0])
    return splits[0][1] if splits and len(splits[0][1]) >= 2 else None


def runs_together(icon_set: IconSet) -> bool:
    """Whether a set's names run words together (fxemoji's ``redapple``): under 5% of them hold a hyphen."""
    return sum("-" in icon.name for icon in icon_set.icons) < 0.05 * max(1, len(icon_set.icons))


def concept_names(sets: list[IconSet], unicode_names: dict[str, str] | None = None) -> list[dict[str, str]]:
    """For every set, ``{icon name: concept}``: one hyphenated concept name per emoji across ``sets``.

    Icons are the same concept when their tone-free names (:func:`base_name`) are equal, when a set renames one to
    the other (alias), when ``chars.json`` gives them one code point, or when a run-together name equals a hyphenated
    name without its hyphens (``redapple``) or a Unicode name or short name of ``unicode_names`` (``smirk``). A link
    that would join two different icons of one set is ignored. A concept is named after its icon in the first set of
    ``sets`` that has it; a run-together name no other set matches is split into words (:func:`segment`:
    ``sakebottleandcup`` -> ``sake-bottle-and-cup``)."""
    graph = _Components()
    bases = []
    for index, icon_set in enumerate(sets):
        names = icon_set.all_names
        base = {icon.name: base_name(icon.name, names) for icon in icon_set.icons}
        bases.append(base)
        for name in set(base.values()):
            graph.add(("name", name), (index, name))
    links = []  # most reliable first: code points, then renames, then run-together names
    for icon_set in sets:
        names = icon_set.all_names
        for codepoints, name in sorted(icon_set.chars.items()):
            key = codepoint_key(codepoints)
            if key is not None:
                links.append((("code", key), ("name", base_name(name, names))))
    for icon_set in sets:
        names = icon_set.all_names
        for alias, parent in sorted(icon_set.renames.items()):
            links.append((("name", base_name(parent, names)), ("name", base_name(alias, names))))
    joined = defaultdict(set)
    for index, icon_set in enumerate(sets):
        names = icon_set.all_names
        for name in names:
            base = base_name(name, names)
            if "-" in base:
                joined[base.replace("-", "")].add(base)
    for base in sorted({b for per_set in bases for b in per_set.values() if "-" not in b}):
        if base in joined:
            links += [(("name", other), ("name", base)) for other in sorted(joined[base])]
        elif unicode_names and base in unicode_names:
            links.append((("code", unicode_names[base]), ("name", base)))
    for a, b in links:
        graph.union(a, b)
    vocabulary = {word for index, per_set in enumerate(bases) if not runs_together(sets[index])
                  for b in per_set.values() for word in b.split("-")}
    named = {}
    for index in range(len(sets)):
        for base in sorted(set(bases[index].values())):
            root = graph.find(("name", base))
            if root not in named:
                words = segment(base, vocabulary) if runs_together(sets[index]) and "-" not in base else None
                named[root] = "-".join(words) if words else base
    return [{name: named[graph.find(("name", base))] for name, base in per_set.items()} for per_set in bases]
