"""Mixed-bit palettization on a tiny pipeline: the search (widths between the offered ones, monotone in the bar), the
recipe applied by the export (per-op widths in the package, average bits in the manifest) and bad recipe files."""

import json

import pytest

pytest.importorskip("coremltools")
pytest.importorskip("sklearn")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")

from diffusers_snapgen.coreml.compress import parse_variants  # noqa: E402
from diffusers_snapgen.coreml.export import MANIFEST_NAME, export_pipeline  # noqa: E402
from diffusers_snapgen.coreml.mixed_bit import (  # noqa: E402
    RECIPE_FORMAT,
    greedy_moves,
    load_recipe,
    package_lut_bits,
    save_recipe,
    search_mixed_bit,
)
from diffusers_snapgen.testing import tiny_pipeline  # noqa: E402

SMALL_UNET = dict(block_out_channels=(16, 32), transformer_layers_per_block=(1, 1),
                  only_cross_attention=(True, False), layers_per_block=1)
BITS = (2, 6)
SETTINGS = dict(resolution=32, group_size=8, weight_threshold=256)


def _pipe():
    return tiny_pipeline(**SMALL_UNET)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One search (UNet only, layer groups, uniform tables for speed) and the PSNR range its moves span."""
    folder = tmp_path_factory.mktemp("mixed")
    recipe, search = search_mixed_bit(_pipe(), folder / "first.json", bar_db=35.0, bits=BITS, components=("unet",),
                                      palettize_mode="uniform", group_depth=3, prompts=["red apple", "a cat"],
                                      progress=None, **SETTINGS)
    widest, narrowest = search.measured_psnr(0), search.measured_psnr(len(search.order))
    return folder, recipe, search, widest, narrowest


def _middle_bar(widest, narrowest):
    return narrowest + 0.5 * (widest - narrowest)


def test_search_recipe_bits_between_offered(searched):
    folder, first, search, widest, narrowest = searched
    assert widest > narrowest  # 6-bit everywhere beats 2-bit everywhere
    assert json.loads((folder / "first.json").read_text())["format"] == RECIPE_FORMAT
    recipe = search.recipe(_middle_bar(widest, narrowest))
    meta = recipe.metadata
    assert meta["meets_bar"] and meta["measured_psnr_db"] >= meta["bar_db"]
    assert min(BITS) <= meta["average_bits_per_weight"] <= max(BITS)
    assert set(recipe.layers) == {"unet"} and set(recipe.layers["unet"].values()) <= set(BITS)
    assert len(recipe.layers["unet"]) > 20 and meta["units"] < len(recipe.layers["unet"])  # grouped search
    path = save_recipe(recipe, folder / "middle.json")
    again = load_recipe(path)
    assert again.layers == recipe.layers and again.metadata["average_bits_per_weight"] == meta["average_bits_per_weight"]


def test_stricter_bar_never_yields_fewer_bits(searched):
    _, _, search, widest, narrowest = searched
    span = widest - narrowest
    bars = [narrowest - 1.0] + [narrowest + f * span for f in (0.2, 0.4, 0.6, 0.8, 0.95)] + [widest + 1.0]
    recipes = [search.recipe(bar) for bar in bars]
    bits = [r.metadata["average_bits_per_weight"] for r in recipes]
    assert bits == sorted(bits)
    assert min(BITS) <= bits[0] < bits[-1] == pytest.approx(max(BITS))
    assert not recipes[-1].metadata["meets_bar"]  # unreachable bar: widest everywhere, flagged
    assert all(r.metadata["meets_bar"] for r in recipes[:-1])


def test_greedy_moves_cheapest_error_per_bit_first():
    sensitivity = {"a": {2: 20.0, 6: 60.0}, "b": {2: 40.0, 6: 60.0}, "c": {2: 40.0, 6: 60.0}}
    sizes = {"a": 10, "b": 10, "c": 1000}
    assert greedy_moves(sensitivity, sizes, (2, 6)) == [("c", 2), ("b", 2), ("a", 2)]


def test_export_applies_recipe(searched, tmp_path):
    folder, _, search, widest, narrowest = searched
    recipe = search.recipe(_middle_bar(widest, narrowest))
    path = save_recipe(recipe, folder / "applied.json")
    out = tmp_path / "export"
    manifest = export_pipeline(_pipe(), out, variants=["fp16", f"mixed:{path}"], components="unet", validate=False,
                               progress=None, **SETTINGS)
    found = package_lut_bits(out / "packages" / "mixed" / "Unet.mlpackage")
    expected = {name.replace(".", "_") + "_to_fp16": bits for name, bits in recipe.layers["unet"].items()}
    assert found == expected
    assert package_lut_bits(out / "packages" / "fp16" / "Unet.mlpackage") == {}
    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    mixed = on_disk["variants"]["mixed"]
    assert mixed["unet_average_bits_per_weight"] == pytest.approx(recipe.metadata["component_bits"]["unet"])
    assert mixed["recipe"]["file"] == "applied.json" and mixed["recipe"]["bar_db"] == recipe.metadata["bar_db"]
    assert on_disk["variants"]["fp16"]["average_bits_per_weight"] == 16.0
    assert mixed["size_bytes"] < on_disk["variants"]["fp16"]["size_bytes"]
    assert mixed["components"]["unet"]["compression"]["parameter_bits"] == recipe.layers["unet"]
    assert manifest["variants"]["mixed"]["average_bits_per_weight"] == mixed["average_bits_per_weight"]


def _recipe_file(folder, name, content):
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_bad_recipe_files_raise_naming_file_and_fix(tmp_path):
    bad_json = _recipe_file(tmp_path, "broken.json", "{not json")
    with pytest.raises(ValueError, match=r"broken\.json.*not valid JSON.*--search-mixed-bit"):
        load_recipe(bad_json)
    bad_bits = _recipe_file(tmp_path, "five.json", {"format": RECIPE_FORMAT,
                                                    "components": {"unet": {"layers": {"unet.conv_in.weight": 5}}}})
    with pytest.raises(ValueError, match=r"five\.json.*5 bits.*\(1, 2, 3, 4, 6, 8\)"):
        load_recipe(bad_bits)
    no_format = _recipe_file(tmp_path, "other.json", {"components": {}})
    with pytest.raises(ValueError, match=r"other\.json.*'format'"):
        load_recipe(no_format)
    with pytest.raises(ValueError, match="is not a file"):
        parse_variants(f"fp16,mixed:{tmp_path / 'missing.json'}")
    unknown = _recipe_file(tmp_path, "unknown.json", {"format": RECIPE_FORMAT, "components": {
        "unet": {"layers": {"unet.no_such_layer.weight": 4}}}})
    out = tmp_path / "export"
    with pytest.raises(ValueError, match=r"unknown\.json.*'unet\.no_such_layer\.weight'.*--search-mixed-bit"):
        export_pipeline(_pipe(), out, variants=[f"mixed:{unknown}"], components="unet", progress=None, **SETTINGS)
    other_component = _recipe_file(tmp_path, "vae.json", {"format": RECIPE_FORMAT, "components": {
        "vae": {"layers": {"decoder.conv_in.weight": 4}}}})
    with pytest.raises(ValueError, match=r"vae\.json.*unknown components \['vae'\]"):
        export_pipeline(_pipe(), out, variants=[f"mixed:{other_component}"], components="unet", progress=None,
                        **SETTINGS)
    assert not out.exists()


def test_cli_search_argument_errors(tmp_path, capsys):
    from diffusers_snapgen.coreml.cli import main

    assert main(["--model", "x", "--search-mixed-bit", str(tmp_path / "r.txt")]) == 2
    assert "--search-mixed-bit must name a .json" in capsys.readouterr().err
    assert main(["--model", "x", "--search-mixed-bit", str(tmp_path / "r.json"), "--search-bits", "2,5"]) == 2
    assert "--search-bits" in capsys.readouterr().err
    assert main(["--model", "x"]) == 2
    assert "--output is required" in capsys.readouterr().err
    assert main(["--model", "x", "--output", str(tmp_path / "o"), "--variants", "fp16,mixed"]) == 2
    assert "mixed:RECIPE.json" in capsys.readouterr().err
