"""training_examples/data/prepare_emoji.py on a tiny hand-written iconify set (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "training_examples" / "data" / "prepare_emoji.py"
_SHAPES = {
    "circle": '<circle cx="16" cy="16" r="12" fill="{}"/>',
    "square": '<rect x="4" y="4" width="24" height="24" fill="{}"/>',
    "triangle": '<path d="M16 3L29 28H3z" fill="{}"/>',
    "bar": '<rect x="2" y="12" width="28" height="8" fill="{}"/>',
    "hand": '<path d="M2 12h20v8H2z" fill="{}"/><circle cx="24" cy="16" r="6" fill="{}"/>',
}
TONES = {"": "#ffc83d", "-light": "#f7d7c4", "-dark": "#6b4a3a"}


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_emoji", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_iconify_json(folder: Path) -> Path:
    """A tiny iconify set: five shapes, two skin tones of `artist`, a flipped alias, a hidden icon, a rename alias,
    and a `vertical-traffic-light` whose `-light` is not a tone. Captions: 8 distinct."""
    icons = {
        "red-apple": {"body": _SHAPES["circle"].format("#f8312f")},
        "blue-square": {"body": _SHAPES["square"].format("#00a6ed")},
        "green-triangle": {"body": _SHAPES["triangle"].format("#00d26a")},
        "vertical-traffic-light": {"body": _SHAPES["bar"].format("#533566"), "width": 16, "left": 8},
        "pointing-left": {"body": _SHAPES["hand"].format("#ffc83d", "#ff6723")},
        "secret-thing": {"body": _SHAPES["circle"].format("#000000"), "hidden": True},
        "purple-ball": {"body": _SHAPES["circle"].format("#8d65c5")},
    }
    for suffix, colour in TONES.items():
        icons[f"artist{suffix}"] = {"body": _SHAPES["square"].format(colour) + _SHAPES["circle"].format("#212121")}
    aliases = {"pointing-right": {"parent": "pointing-left", "hFlip": True}, "apple-again": {"parent": "red-apple"}}
    data = {"prefix": "tiny", "width": 32, "height": 32, "icons": icons, "aliases": aliases}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "icons.json"
    path.write_text(json.dumps(data))
    (folder / "info.json").write_text(json.dumps({"name": "Tiny", "license": {"spdx": "MIT"}}))
    return path


def make_dataset(tmp_path: Path, resolution: int = 32, holdout: float = 0.45, name: str = "emoji") -> Path:
    """Render the tiny set into ``tmp_path/name`` with the script's ``main``; returns the folder. With the default
    hold-out fraction the test split is `artist` (3 tones) and `blue square`."""
    icons = write_iconify_json(tmp_path / "iconify")
    out = tmp_path / name
    code = load_script().main(["--output", str(out), "--iconify-json", str(icons), "--resolution", str(resolution),
                               "--holdout-fraction", str(holdout), "--quiet"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def script():
    return load_script()


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_captions_drop_tone_suffixes_only_when_the_base_exists(script):
    names = {"artist", "artist-dark", "artist-medium-light", "vertical-traffic-light", "dark-sunglasses"}
    assert script.group_of("artist-dark", names) == "artist"
    assert script.group_of("artist-medium-light", names) == "artist"
    assert script.group_of("vertical-traffic-light", names) == "vertical-traffic-light"
    assert script.caption_of(script.group_of("red-apple", names)) == "red apple"


def test_split_is_a_fixed_function_of_the_group(script):
    groups = [f"emoji-{i}" for i in range(2000)]
    held = [g for g in groups if script.is_heldout(g, 0.05)]
    assert 60 < len(held) < 140  # ~5%
    assert held == [g for g in groups if script.is_heldout(g, 0.05)]
    assert set(held) <= {g for g in groups if script.is_heldout(g, 0.1)}  # growing the fraction only adds
    icons = script.IconSet("tiny", [script.Icon(g, "", 0, 0, 16, 16) for g in groups])
    sample = script.plan([icons], 0.05, limit=300)  # --limit must not favour either split
    assert len(sample) == 300 and 3 <= sum(r["split"] == "test" for r in sample) <= 30
    assert [r["name"] for r in sample] == [r["name"] for r in script.plan([icons], 0.05, limit=300)]


def test_render_centres_on_white_keeps_aspect_and_flips(script, tmp_path):
    icon_set = script.read_icon_set(write_iconify_json(tmp_path))
    by_name = {icon.name: icon for icon in icon_set.icons}
    assert "secret-thing" not in by_name and "apple-again" not in by_name  # hidden icon, pure rename alias
    assert icon_set.renames == {"apple-again": "red-apple"}  # kept as a name link, not rendered
    assert by_name["pointing-right"].h_flip and not by_name["pointing-left"].h_flip
    assert icon_set.info["license"]["spdx"] == "MIT"
    apple = script.render(by_name["red-apple"], 64)
    assert apple.size == (64, 64) and apple.mode == "RGB"
    assert apple.getpixel((0, 0)) == (255, 255, 255) and apple.getpixel((32, 32)) == (248, 49, 47)
    bar = script.render(by_name["vertical-traffic-light"], 64)  # 16 x 32 view box -> 32 x 64, centred
    assert bar.getpixel((4, 32)) == (255, 255, 255) and bar.getpixel((32, 32)) != (255, 255, 255)
    left, right = script.render(by_name["pointing-left"], 64), script.render(by_name["pointing-right"], 64)
    assert left.transpose(0).tobytes() == right.tobytes()  # 0 = FLIP_LEFT_RIGHT


def test_dataset_layout_metadata_and_prompts(tmp_path):
    out = make_dataset(tmp_path)
    train, test = read_rows(out / "train" / "metadata.jsonl"), read_rows(out / "test" / "metadata.jsonl")
    assert len(train) + len(test) == 10  # 9 visible icons + the flipped alias
    for split, rows in (("train", train), ("test", test)):
        for row in rows:
            assert set(row) == {"file_name", "text", "name"} and row["file_name"] == f"{row['name']}.png"
            assert (out / split / row["file_name"]).is_file()
    by_name = {row["name"]: row for row in train + test}
    assert by_name["artist-dark"]["text"] == "artist" and by_name["pointing-right"]["text"] == "pointing right"
    split_of = {row["name"]: split for split, rows in (("train", train), ("test", test)) for row in rows}
    assert split_of["artist"] == split_of["artist-dark"] == split_of["artist-light"]
    prompts = json.loads((out / "eval_prompts.json").read_text())
    assert prompts["heldout"] == sorted({row["text"] for row in test}) == ["artist", "blue square"]
    assert set(prompts["seen"]) <= {row["text"] for row in train} and len(prompts["seen"]) <= len(prompts["heldout"])
    source = json.loads((out / "source.json").read_text())
    assert source["images"] == {"train": len(train), "test": len(test)} and source["license"]["spdx"] == "MIT"
    assert not (tmp_path / "emoji.tmp").exists()


def test_imagefolder_reads_both_splits_like_the_training_scripts(tmp_path):
    from datasets import load_dataset

    out = make_dataset(tmp_path, resolution=32)
    dataset = load_dataset("imagefolder", data_dir=str(out))
    assert set(dataset) == {"train", "test"}
    assert {"image", "text", "name"} <= set(dataset["train"].column_names)
    assert dataset["train"][0]["image"].size == (32, 32)


def test_limit_overwrite_and_errors(tmp_path, capsys, script):
    icons = write_iconify_json(tmp_path / "iconify")
    out = tmp_path / "emoji"
    assert script.main(["-o", str(out), "--iconify-json", str(icons), "--resolution", "16", "--limit", "4",
                        "--quiet"]) == 0
    assert sum(1 for _ in out.rglob("*.png")) == 4
    # an existing folder is kept unless --overwrite
    assert script.main(["-o", str(out), "--iconify-json", str(icons), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert script.main(["-o", str(out), "--iconify-json", str(icons), "--resolution", "16", "--overwrite",
                        "--quiet"]) == 0
    assert sum(1 for _ in out.rglob("*.png")) == 10 and not (tmp_path / "emoji.old").exists()
    assert not (out / "test").exists() and "a split is empty" in capsys.readouterr().err  # 5% of 8 captions: none
    for bad in (["--resolution", "0"], ["--holdout-fraction", "1.5"], ["--iconify-json", str(tmp_path / "no.json")]):
        argv = ["-o", str(tmp_path / "x")] + (bad if "--iconify-json" in bad else ["--iconify-json", str(icons)] + bad)
        assert script.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("prepare_emoji.py: error:")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()
    (tmp_path / "broken.json").write_text('{"icons": 3}')
    with pytest.raises(ValueError, match="iconify"):
        script.read_icon_set(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="resolution"):
        script.prepare(icons, tmp_path / "y", resolution=0)
