"""Multi-set emoji data (training_examples/data/): names across sets, captions, both held-out kinds, the offline pack
and the two SVG renderers, on real icons of every set committed under tests/fixtures/emoji (nothing is downloaded)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_emoji_data import load_script, read_rows

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "emoji"
SET_KEYS = ("noto", "twemoji", "fluent-emoji-flat", "emojione", "fxemoji")
KINDS = ("seen", "heldout_pair", "heldout_concept")


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def sets(script):
    import emoji_sets

    return [emoji_sets.read_icon_set(FIXTURES / key) for key in SET_KEYS]


@pytest.fixture(scope="module")
def unicode_names():
    import emoji_sets

    return emoji_sets.read_unicode_names(FIXTURES / "names.json")


def concept_of(sets, unicode_names=None) -> dict[tuple[str, str], str]:
    import emoji_sets

    names = emoji_sets.concept_names(sets, unicode_names)
    return {(s.style, name): concept for s, per_set in zip(sets, names) for name, concept in per_set.items()}


def test_base_names_and_run_together_names(script):
    import emoji_sets

    names = {"man-beard", "thumbs-up", "thumbs-up-dark", "vertical-traffic-light"}
    assert emoji_sets.base_name("man-dark-skin-tone-beard", names) == "man-beard"
    assert emoji_sets.base_name("kiss-person-person-dark-skin-tone-medium-skin-tone", names) == "kiss-person-person"
    assert emoji_sets.base_name("thumbs-up-dark", names) == "thumbs-up"
    assert emoji_sets.base_name("vertical-traffic-light", names) == "vertical-traffic-light"
    assert emoji_sets.base_name("dark-skin-tone", names) == "dark-skin-tone"  # the swatch itself is an emoji
    assert emoji_sets.base_name("flag-for-peru", names) == "flag-peru"
    assert emoji_sets.base_name("flag-for-white-flag", names) == "white-flag"
    assert emoji_sets.codepoint_key("1F44D-1F3FF") == "1f44d" and emoji_sets.codepoint_key("FE0F") is None
    vocabulary = {"sake", "bottle", "and", "cup", "a", "corn", "hearts", "pin", "pink", "in", "italian"}
    assert emoji_sets.segment("sakebottleandcup", vocabulary) == ["sake", "bottle", "and", "cup"]
    assert emoji_sets.segment("2hearts", vocabulary) == ["2", "hearts"]
    assert emoji_sets.segment("acorn", vocabulary) is None  # one-letter words do not count: no "a corn"
    assert emoji_sets.segment("pinkwallet", vocabulary) == ["pink", "wallet"]  # one unknown chunk, most known letters
    assert emoji_sets.segment("index", vocabulary) is None  # beside an unknown chunk, no two-letter word: no "in dex"
    assert emoji_sets.segment("italian", vocabulary) is None  # a known word is not split


def test_one_concept_per_emoji_across_sets(sets, unicode_names):
    assert [s.style for s in sets] == ["noto", "twemoji", "fluent", "emojione", "fxemoji"]
    concept = concept_of(sets, unicode_names)
    apple = {concept[(s.style, n)] for s, n in zip(sets, ["red-apple"] * 4 + ["redapple"])}
    assert apple == {"red-apple"}  # fxemoji's run-together name matches the hyphenated one
    assert concept[("fxemoji", "smirk")] == "smirking-face"  # a Unicode short name -> code point -> the concept
    assert concept[("fluent", "person-elf")] == concept[("noto", "elf")] == "elf"  # one code point; noto names it
    assert concept[("noto", "thumbs-up-dark-skin-tone")] == concept[("fluent", "thumbs-up-dark")] == "thumbs-up"
    assert concept[("emojione", "flag-for-peru")] == concept[("twemoji", "flag-peru")] == "flag-peru"
    assert concept[("emojione", "a-button")] == "a-button-blood-type"  # twemoji's alias renames it
    assert concept[("fxemoji", "blackdroplet")] == "black-droplet"  # in no other set: split into known words
    assert concept[("fluent", "backhand-index-pointing-right")] != concept[("fluent", "backhand-index-pointing-left")]
    without = concept_of(sets)
    assert without[("fxemoji", "smirk")] == "smirk" and without[("fxemoji", "redapple")] == "red-apple"


def test_links_never_join_two_icons_of_one_set(script):
    import emoji_sets

    first = emoji_sets.IconSet("first", [emoji_sets.Icon(n, "", 0, 0, 16, 16) for n in ("cricket", "cricket-game")])
    second = emoji_sets.IconSet("second", [emoji_sets.Icon("cricket-game", "", 0, 0, 16, 16)],
                                renames={"cricket": "cricket-game"})  # an old name of the bat and ball
    concept = concept_of([first, second])
    assert concept[("first", "cricket")] == "cricket" and concept[("first", "cricket-game")] == "cricket-game"
    assert concept[("second", "cricket-game")] == "cricket-game"


def synthetic_sets(script, concepts: int = 600, seed: int = 0):
    """Five sets drawing random subsets of ``concepts`` emoji (some in one style only), one with two tones."""
    rng = random.Random(seed)
    sets = []
    for style in ("alpha", "beta", "gamma", "delta", "epsilon"):
        names = [f"emoji-{i}" for i in range(concepts) if rng.random() < 0.6]
        names += [f"{n}-dark-skin-tone" for n in names if rng.random() < 0.2]
        sets.append(script.IconSet(style, [script.Icon(n, "", 0, 0, 16, 16) for n in names]))
    return sets


def check_no_leakage(records) -> None:
    train = [r for r in records if r["split"] == "train"]
    train_concepts = {r["concept"] for r in train}
    train_pairs = {(r["concept"], r["style"]) for r in train}
    for r in records:
        assert r["split"] == ("train" if r["kind"] == "seen" else "test")
        if r["kind"] == "heldout_concept":
            assert r["concept"] not in train_concepts
        if r["kind"] == "heldout_pair":
            assert (r["concept"], r["style"]) not in train_pairs
            assert any(c == r["concept"] and s != r["style"] for c, s in train_pairs)  # seen in another style


def test_both_heldout_kinds_without_leakage_and_deterministic(script):
    sets = synthetic_sets(script)
    records = script.plan(sets, holdout_fraction=0.05, pair_fraction=0.1)
    check_no_leakage(records)
    concepts = {r["concept"] for r in records}
    held_concepts = {r["concept"] for r in records if r["kind"] == "heldout_concept"}
    assert 0.02 < len(held_concepts) / len(concepts) < 0.1
    pairs = {(r["concept"], r["style"]) for r in records}
    held_pairs = {(r["concept"], r["style"]) for r in records if r["kind"] == "heldout_pair"}
    assert 0.05 < len(held_pairs) / len(pairs) < 0.15
    tones = {(r["concept"], r["style"]): r["kind"] for r in records if r["name"].endswith("-dark-skin-tone")}
    assert all(kind == next(x["kind"] for x in records if x["concept"] == c and x["style"] == s
                                                              and x["name"] == c) for (c, s), kind in tones.items())
    # a pure function of names: the same split again, in any set order, and inside any --limit sample
    again = script.plan(list(reversed(synthetic_sets(script))), holdout_fraction=0.05, pair_fraction=0.1)
    assert {(r["style"], r["name"]): r["kind"] for r in again} == {(r["style"], r["name"]): r["kind"] for r in records}
    kind = {(r["style"], r["name"]): r["kind"] for r in records}
    sample = script.plan(sets, holdout_fraction=0.05, pair_fraction=0.1, limit=300)
    assert len(sample) == 300 and all(r["kind"] == kind[(r["style"], r["name"])] for r in sample)
    # a pair is held out only when its concept has another style to learn it from, even at fraction ~1
    check_no_leakage(script.plan(sets, holdout_fraction=0.0, pair_fraction=0.999))


def build(script, tmp_path: Path, name: str, argv: list[str]) -> Path:
    out = tmp_path / name
    assert script.main(["--output", str(out), "--resolution", "32", "--quiet", "--holdout-fraction", "0.37",
                        "--pair-fraction", "0.4", *argv]) == 0
    return out


@pytest.fixture(scope="module")
def dataset(script, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("multi")
    return build(script, tmp, "emoji", ["--iconify-json", *(str(FIXTURES / k) for k in SET_KEYS),
                                        "--unicode-names", str(FIXTURES / "names.json"), "--renderer", "resvg"])


def test_multi_set_dataset_rows_captions_and_prompts(dataset):
    train, test = read_rows(dataset / "train" / "metadata.jsonl"), read_rows(dataset / "test" / "metadata.jsonl")
    assert len({r["file_name"] for r in train}) + len(test) == 27 and len(train) == 2 * len({r["file_name"]
                                                                                            for r in train})
    for rows in (train, test):  # imagefolder needs the same columns in both splits
        assert all(set(r) == {"file_name", "text", "name", "concept", "style", "kind"} for r in rows)
    for styled, bare in zip(train[::2], train[1::2]):  # every training image: styled caption, then the bare concept
        assert styled["file_name"] == bare["file_name"] == f"{styled['style']}-{styled['name']}.png"
        assert styled["text"] == f"{styled['concept']}, {styled['style']} style" and bare["text"] == bare["concept"]
    assert all(r["text"] == f"{r['concept']}, {r['style']} style" for r in test)
    records = [dict(r, concept=r["concept"], split=split) for split, rows in (("train", train[::2]), ("test", test))
               for r in rows]
    check_no_leakage(records)
    assert {r["kind"] for r in test} == {"heldout_pair", "heldout_concept"}  # both kinds present at these fractions
    prompts = json.loads((dataset / "eval_prompts.json").read_text())
    assert list(prompts) == list(KINDS)
    assert set(prompts["heldout_pair"]) == {r["text"] for r in test if r["kind"] == "heldout_pair"}
    assert {p.split(",")[0] for p in prompts["heldout_concept"]} == {r["concept"] for r in test
                                                                     if r["kind"] == "heldout_concept"}
    assert set(prompts["seen"]) <= {r["text"] for r in train}
    source = json.loads((dataset / "source.json").read_text())
    assert [s["style"] for s in source["sets"]] == ["noto", "twemoji", "fluent", "emojione", "fxemoji"]
    assert source["images"] == {"train": len(train) // 2, "test": len(test)} and source["renderer"] == "resvg"
    required = source["attribution_required"]
    assert len(required) == 2 and all("CC BY 4.0" in line for line in required)  # Twemoji and EmojiOne
    assert sum(s["images"] for s in source["sets"]) == 27


def test_imagefolder_reads_duplicate_rows(dataset):
    from datasets import load_dataset

    data = load_dataset("imagefolder", data_dir=str(dataset))
    assert len(data["train"]) == len(read_rows(dataset / "train" / "metadata.jsonl"))
    first, second = data["train"][0], data["train"][1]
    assert first["image"].tobytes() == second["image"].tobytes() and first["text"].startswith(second["text"] + ", ")


def test_renderers_agree_on_real_icons_of_every_set(sets):
    import emoji_render

    for icon_set in sets:
        for icon in icon_set.icons:
            a = np.asarray(emoji_render.render(icon, 64, renderer="resvg"), dtype=np.float32)
            b = np.asarray(emoji_render.render(icon, 64, renderer="cairosvg"), dtype=np.float32)
            assert a.shape == (64, 64, 3) and (a < 250).any(axis=2).mean() > 0.1, icon.name  # drawn, not blank
            assert np.abs(a - b).mean() < 2.0, (icon_set.style, icon.name)  # out of 255
    with pytest.raises(ValueError, match="--renderer"):
        emoji_render.available_renderer("skia")


def test_pack_then_prepare_offline_matches_the_direct_build(script, dataset, tmp_path):
    import pack_emoji
    from emoji_sets import NAMES_PACKAGE, SETS

    cache = tmp_path / "cache"  # what `npm pack` leaves in the cache, from the fixtures: nothing is fetched
    for key in SET_KEYS:
        shutil.copytree(FIXTURES / key, cache / f"{key}-{SETS[key].version}")
    names = cache / f"{NAMES_PACKAGE.key}-{NAMES_PACKAGE.version}"
    names.mkdir()
    shutil.copyfile(FIXTURES / "names.json", names / "emoji.json")
    (names / "package.json").write_text('{"name": "emoji-datasource", "version": "16.0.0"}')
    manifest = pack_emoji.pack(tmp_path / "pack", list(SET_KEYS), cache, wheel=False)
    assert manifest["sets"] == list(SET_KEYS) and (tmp_path / "pack" / "noto" / "icons.json.xz").is_file()
    assert not (tmp_path / "pack" / "noto" / "icons.json").exists()
    offline = build(script, tmp_path, "offline", ["--pack", str(tmp_path / "pack"), "--renderer", "resvg"])
    for name in ("train/metadata.jsonl", "test/metadata.jsonl", "eval_prompts.json"):
        assert (offline / name).read_text() == (dataset / name).read_text()
    assert script.main(["--output", str(tmp_path / "x"), "--pack", str(tmp_path)]) == 2  # no manifest there
