"""Mixed-bit palettization on a tiny pipeline: the search (widths between the offered ones, monotone in the bar), the
recipe applied by the export (per-op widths in the package, average bits in the manifest, look-up tables counted)
and bad recipe files."""

import json

import pytest
import torch

pytest.importorskip("coremltools")
pytest.importorskip("sklearn")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")

from diffusers_snapgen.coreml.compress import parse_variants, stored_bits  # noqa: E402
from diffusers_snapgen.coreml.export import MANIFEST_NAME, export_pipeline  # noqa: E402
from diffusers_snapgen.coreml.mixed_bit import (  # noqa: E402
    RECIPE_FORMAT,
    MixedBitSearch,
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
    assert meta["average_bits_per_weight"] < meta["average_bits_per_weight_with_luts"]  # tables counted as well
    assert meta["component_bits_with_luts"]["unet"] == meta["average_bits_per_weight_with_luts"]
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


def test_recipe_of_at_most_max_bits_is_the_first_that_fits(searched):
    _, _, search, widest, narrowest = searched
    high, low = (search.recipe(bar, max_bits=None).metadata for bar in (widest + 1.0, narrowest - 1.0))
    span = high["average_bits_per_weight_with_luts"] - low["average_bits_per_weight_with_luts"]
    previous = None
    for fraction in (0.8, 0.5, 0.2):
        target = low["average_bits_per_weight_with_luts"] + fraction * span
        meta = search.recipe(35.0, max_bits=target).metadata
        assert meta["meets_max_bits"] and meta["average_bits_per_weight_with_luts"] <= target
        assert meta["max_bits"] == target
        assert meta["measured_psnr_db"] == pytest.approx(search.measured_psnr(meta["moves_applied"]), abs=1e-3)
        # one move fewer would not fit: the recipe is the largest (best) one of that size in the greedy order
        before = search.assignment(meta["moves_applied"] - 1)
        stored = sum(search._stored_bits(unit, b) for unit, b in before.items())
        assert stored > target * sum(search.sizes.values())
        assert previous is None or meta["moves_applied"] > previous
        previous = meta["moves_applied"]
    tiny = search.recipe(35.0, max_bits=1.0).metadata  # smaller than all-narrowest: every move, flagged
    assert not tiny["meets_max_bits"] and tiny["moves_applied"] == len(search.order)
    with pytest.raises(ValueError, match="`max_bits`"):
        search.recipe(35.0, max_bits=0.5)


def test_saved_sensitivities_give_the_same_recipe_without_measuring(searched, tmp_path):
    folder, first, search, widest, narrowest = searched
    bar = _middle_bar(widest, narrowest)
    kwargs = dict(bits=BITS, components=("unet",), palettize_mode="uniform", group_depth=3,
                  prompts=["red apple", "a cat"], progress=None, **SETTINGS)
    counted = []
    original = MixedBitSearch.measure
    try:
        MixedBitSearch.measure = lambda self: counted.append(1) or original(self)
        again, reused = search_mixed_bit(_pipe(), tmp_path / "again.json", bar_db=bar,
                                         sensitivities_from=folder / "first.json", **kwargs)
    finally:
        MixedBitSearch.measure = original
    assert counted == [] and reused.evaluations <= 4  # fp16, then a few assignments: no sensitivity pass
    assert again.layers == search.recipe(bar).layers
    with pytest.raises(ValueError, match="other settings .*group_depth|units"):
        search_mixed_bit(_pipe(), None, sensitivities_from=folder / "first.json", **{**kwargs, "group_depth": 2})
    with pytest.raises(ValueError, match="other settings .*quality"):
        search_mixed_bit(_pipe(), None, sensitivities_from=folder / "first.json", **{**kwargs, "prompts": ["a cat"]})
    with pytest.raises(ValueError, match="other settings .*bits_offered"):  # refused before any conversion
        search_mixed_bit(_pipe(), None, sensitivities_from=folder / "first.json", **{**kwargs, "bits": (2, 4, 6)})


def test_saved_sensitivities_may_offer_more_widths_than_the_search():
    weight = torch.zeros(16, 16)
    search = MixedBitSearch({"unet": {"w": {4: weight, 8: weight}}}, lambda states: 0.0, (4, 8))
    search.use_sensitivities({"unet/w": {"3": 20.0, "4": 30.0, "6": 40.0, "8": 50.0}})
    assert search.sensitivity == {"unet/w": {4: 30.0, 8: 50.0}} and search.order == [("unet/w", 4)]
    with pytest.raises(ValueError, match="do not cover"):
        search.use_sensitivities({"unet/w": {"3": 20.0, "4": 30.0}})  # no 8-bit value
    with pytest.raises(ValueError, match="do not cover"):
        search.use_sensitivities({"unet/other": {"4": 30.0, "8": 50.0}})


def test_greedy_moves_cheapest_error_per_bit_first():
    sensitivity = {"a": {2: 20.0, 6: 60.0}, "b": {2: 40.0, 6: 60.0}, "c": {2: 40.0, 6: 60.0}}
    sizes = {"a": 10, "b": 10, "c": 1000}
    assert greedy_moves(sensitivity, sizes, (2, 6)) == [("c", 2), ("b", 2), ("a", 2)]


def test_greedy_moves_count_look_up_tables_when_given_costs():
    sensitivity = {"a": {4: 39.0, 8: 60.0}, "b": {4: 40.0, 8: 60.0}}
    sizes = {"a": 100, "b": 100}
    assert greedy_moves(sensitivity, sizes, (4, 8))[0] == ("b", 4)  # index bits only: b adds less error
    # a's 8-bit tables cost 3000 bits: lowering a saves 3400 bits, b only 400 -> a first
    costs = {"a": {8: 800 + 3000, 4: 400 + 200}, "b": {8: 800 + 16, 4: 400 + 16}}
    assert greedy_moves(sensitivity, sizes, (4, 8), costs)[0] == ("a", 4)
    with pytest.raises(ValueError, match="`costs` lacks"):
        weight = torch.zeros(4, 4)
        MixedBitSearch({"unet": {"w": {4: weight, 8: weight}}}, lambda s: 0.0, (4, 8), costs={"unet": {"w": {8: 1}}})


def test_stored_bits_count_indices_and_tables():
    from diffusers_snapgen.coreml.compress import palettizable_parameters, palettize
    from diffusers_snapgen.coreml.components import unet_component
    from diffusers_snapgen.coreml.convert import convert_module

    spec = unet_component(_pipe().unet, 4)
    mlmodel, _, _ = convert_module(spec.module, spec.inputs, spec.output_names, target="iOS18")
    eligible = palettizable_parameters(mlmodel, spec.module, 256)
    dense = stored_bits(mlmodel, spec.module)
    assert all(dense[p] == 16 * m["numel"] for p, m in eligible.items())  # fp16, no tables
    model, info = palettize(mlmodel, spec.module, 3, "iOS18", group_size=8, weight_threshold=256)
    packed = stored_bits(model, spec.module)
    for p, m in eligible.items():
        rows = m["shape"][0]
        tables = rows // 8 if rows % 8 == 0 and rows > 8 else 1
        assert packed[p] == 3 * m["numel"] + tables * 2**3 * 16  # uint3 indices + fp16 tables of 8 entries
    assert info["average_bits_per_weight"] == 3.0 < info["average_bits_per_weight_with_luts"]


def test_eight_bit_linear_stores_int8_with_one_scale_per_channel():
    from diffusers_snapgen.coreml.compress import decompressed_state_dict, palettizable_parameters, palettize
    from diffusers_snapgen.coreml.components import unet_component
    from diffusers_snapgen.coreml.convert import convert_module

    spec = unet_component(_pipe().unet, 4)
    mlmodel, _, _ = convert_module(spec.module, spec.inputs, spec.output_names, target="iOS18")
    eligible = palettizable_parameters(mlmodel, spec.module, 256)
    widths = {p: (8 if i % 2 == 0 else 4) for i, p in enumerate(sorted(eligible))}
    model, info = palettize(mlmodel, spec.module, widths, "iOS18", group_size=8, weight_threshold=256,
                            eight_bit="linear")
    assert info["eight_bit"] == "linear"
    assert info["linear_quantized_tensors"] == sum(b == 8 for b in widths.values())
    assert info["palettized_tensors"] == sum(b == 4 for b in widths.values())
    packed = stored_bits(model, spec.module)
    state = decompressed_state_dict(model, spec.module)
    params = dict(spec.module.named_parameters())
    for p, bits in widths.items():
        meta, weight = eligible[p], params[p].detach()
        error = float((state[p] - weight).abs().max() / weight.abs().max())
        if bits == 8:  # int8 indices + one fp16 scale per output channel, at most half a step off
            assert packed[p] == 8 * meta["numel"] + meta["shape"][0] * 16
            assert error <= 0.5 / 127 + 1e-3
        else:
            assert packed[p] == 4 * meta["numel"] + (meta["shape"][0] // 8 if meta["shape"][0] > 8 else 1) * 16 * 16
    ops = {op.op_type for op in model._mil_program.functions["main"].operations}
    assert {"constexpr_blockwise_shift_scale", "constexpr_lut_to_dense"} <= ops
    with pytest.raises(ValueError, match="eight_bit"):
        palettize(mlmodel, spec.module, 8, "iOS18", eight_bit="int8")


def test_export_applies_recipe(searched, tmp_path):
    folder, _, search, widest, narrowest = searched
    recipe = search.recipe(_middle_bar(widest, narrowest))
    recipe.layers["unet"][sorted(recipe.layers["unet"])[0]] = 3  # 3-bit tables (uint3 indices) are applied too
    path = save_recipe(recipe, folder / "applied.json")
    out = tmp_path / "export"
    # the export's own group size (4) is for uniform variants: the mixed one keeps the recipe's (8)
    manifest = export_pipeline(_pipe(), out, variants=["fp16", f"mixed:{path}"], components="unet", validate=False,
                               progress=None, **{**SETTINGS, "group_size": 4})
    found = package_lut_bits(out / "packages" / "mixed" / "Unet.mlpackage")
    expected = {name.replace(".", "_") + "_to_fp16": bits for name, bits in recipe.layers["unet"].items()}
    assert found == expected
    assert package_lut_bits(out / "packages" / "fp16" / "Unet.mlpackage") == {}
    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    mixed = on_disk["variants"]["mixed"]
    assert mixed["components"]["unet"]["compression"]["group_size"] == SETTINGS["group_size"]
    assert mixed["recipe"]["group_size"] == SETTINGS["group_size"]
    assert mixed["unet_average_bits_per_weight"] < mixed["unet_average_bits_per_weight_with_luts"]
    assert on_disk["variants"]["fp16"]["unet_average_bits_per_weight_with_luts"] == 16.0
    assert mixed["recipe"]["file"] == "applied.json" and mixed["recipe"]["bar_db"] == recipe.metadata["bar_db"]
    assert on_disk["variants"]["fp16"]["average_bits_per_weight"] == 16.0
    assert mixed["size_bytes"] < on_disk["variants"]["fp16"]["size_bytes"]
    assert mixed["components"]["unet"]["compression"]["parameter_bits"] == recipe.layers["unet"]
    assert manifest["variants"]["mixed"]["average_bits_per_weight"] == mixed["average_bits_per_weight"]

    # a recipe searched with 8-bit layers as int8 (eight_bit="linear") is exported the same way
    recipe.layers["unet"] = {name: 8 for name in recipe.layers["unet"]}
    recipe.metadata["eight_bit"] = "linear"
    path = save_recipe(recipe, folder / "linear.json")
    out = tmp_path / "export-linear"
    export_pipeline(_pipe(), out, variants=[f"mixed:{path}"], components="unet", validate=False, progress=None,
                    **SETTINGS)
    assert package_lut_bits(out / "packages" / "mixed" / "Unet.mlpackage") == {}  # no 8-bit tables
    linear = json.loads((out / MANIFEST_NAME).read_text())["variants"]["mixed"]
    assert linear["recipe"]["eight_bit"] == "linear"
    assert linear["components"]["unet"]["compression"]["linear_quantized_tensors"] == len(recipe.layers["unet"])
    assert 8.0 < linear["unet_average_bits_per_weight_with_luts"] < 9.0  # scales counted


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
    bad_groups = _recipe_file(tmp_path, "groups.json", {"format": RECIPE_FORMAT, "group_size": 0, "components": {
        "unet": {"layers": {"unet.conv_in.weight": 4}}}})
    with pytest.raises(ValueError, match=r"groups\.json.*'group_size' must be a positive int"):
        load_recipe(bad_groups)
    bad_kind = _recipe_file(tmp_path, "kind.json", {"format": RECIPE_FORMAT, "eight_bit": "int8", "components": {
        "unet": {"layers": {"unet.conv_in.weight": 8}}}})
    with pytest.raises(ValueError, match=r"kind\.json.*'eight_bit' must be one of \('palette', 'linear'\)"):
        load_recipe(bad_kind)
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
    assert main(["--model", "x", "--search-mixed-bit", str(tmp_path / "r.json"), "--target-bits", "0.5"]) == 2
    assert "--target-bits must be" in capsys.readouterr().err
    assert main(["--model", "x", "--search-mixed-bit", str(tmp_path / "r.json"), "--sensitivities-from",
                 str(tmp_path / "missing.json")]) == 2
    assert "--sensitivities-from" in capsys.readouterr().err
    assert main(["--model", "x", "--output", str(tmp_path / "o"), "--target-bits", "4.5"]) == 2
    assert "apply to --search-mixed-bit" in capsys.readouterr().err


# --------------------------------------------------------------------------- classifier top-1 and the benchmark


def _fixed_classifier(favourite: str, classes=("red apple", "a cat", "blue car")):
    """An emoji classifier that puts every image in class ``favourite`` (zero head weights, one-hot bias)."""
    import torch

    from diffusers_snapgen.evaluation import EmojiClassifier

    model = EmojiClassifier(list(classes), image_size=16, widths=(4, 8)).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[model.class_index(favourite)] = 10.0
    return model


def test_end_to_end_classifier_top1_by_concept_and_group():
    import torch

    from diffusers_snapgen.coreml.components import pipeline_components
    from diffusers_snapgen.coreml.quality import EndToEndQuality

    pipe = _pipe()
    specs = pipeline_components(pipe, 32, ["unet", "decoder", "text"])
    prompts = ["red apple, noto style", "a cat", "blue car", "red apple"]
    groups = ["seen", "seen", "heldout_pair", "heldout_pair"]
    quality = EndToEndQuality(pipe, specs, 32, prompts, [0, 1, 2, 3], classifier=_fixed_classifier("red apple"),
                              groups=groups)
    settings = quality.settings()
    # the styled caption counts for its concept, as in `snapgen eval`: 2 of 4 prompts are "red apple"
    assert settings["classifier"] == {"classes": 3, "reference_top1": 0.5,
                                      "reference_top1_by_group": {"seen": 0.5, "heldout_pair": 0.5}}
    assert settings["groups"] == groups
    unet = next(s for s in specs if s.name == "unet").module
    noisy = {"unet": {k: v + 0.05 * torch.randn_like(v) for k, v in unet.named_parameters() if v.ndim >= 2}}
    report = quality.report(noisy)
    assert report["classifier_top1"] == 0.5 and report["classifier_same_class_as_reference"] == 1.0
    assert set(report["by_group"]) == {"seen", "heldout_pair"}
    assert all(g["images"] == 2 and g["classifier_top1"] == 0.5 for g in report["by_group"].values())
    assert isinstance(report["image_psnr_db"], float) and report["image_psnr_db"] < 200
    with pytest.raises(ValueError, match=r"1 prompt\(s\) are not classes of the classifier.*'a dog'"):
        EndToEndQuality(pipe, specs, 32, ["a dog", "a cat"], classifier=_fixed_classifier("a cat"))
    with pytest.raises(ValueError, match="`groups` must be one non-empty string per prompt"):
        EndToEndQuality(pipe, specs, 32, ["a cat"], groups=["seen", "seen"])


def test_top1_vs_fp16_points():
    from diffusers_snapgen.coreml.export import _top1_vs_fp16

    variants = {"fp16": {"end_to_end": {"classifier_top1": 0.12}}, "mixed": {"end_to_end": {"classifier_top1": 0.105}},
                "palettize4": {"end_to_end": {"image_psnr_db": 20.0}}}
    _top1_vs_fp16(variants)
    assert variants["fp16"]["end_to_end"]["classifier_top1_vs_fp16_points"] == 0.0
    assert variants["mixed"]["end_to_end"]["classifier_top1_vs_fp16_points"] == -1.5
    assert "classifier_top1_vs_fp16_points" not in variants["palettize4"]["end_to_end"]


def _benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "coreml_mixed_bit.py"
    spec = importlib.util.spec_from_file_location("coreml_mixed_bit_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_eval_prompts_both_formats(tmp_path):
    bench = _benchmark()
    data = tmp_path / "eval_prompts.json"
    data.write_text(json.dumps({"seen": [f"s{i}, noto style" for i in range(6)],
                                "heldout_pair": [f"h{i}, fluent style" for i in range(6)], "heldout_concept": ["x"]}))
    search, report = bench.eval_pairs(2, 3, data)
    assert report == [[f"s{i}, noto style", 0, "seen"] for i in range(3)] + \
        [[f"h{i}, fluent style", 0, "heldout_pair"] for i in range(3)]
    assert search == [["s3, noto style", 1, "seen"], ["s4, noto style", 1, "seen"],
                      ["h3, fluent style", 1, "heldout_pair"], ["h4, fluent style", 1, "heldout_pair"]]
    table = tmp_path / "eval_quality.json"  # the `snapgen eval` table: same prompts, other seeds
    table.write_text(json.dumps({"prompts": [{"prompt": f"{g}{i // 2}", "group": g, "seed": i}
                                             for g in ("seen", "heldout") for i in range(8)]}))
    search, report = bench.eval_pairs(2, 3, table)
    assert search == [["seen0", 0, "seen"], ["seen1", 2, "seen"], ["heldout0", 0, "heldout"],
                      ["heldout1", 2, "heldout"]]
    assert report[:3] == [["seen0", 1, "seen"], ["seen1", 3, "seen"], ["seen2", 4, "seen"]]
    assert not {(p, s) for p, s, _ in search} & {(p, s) for p, s, _ in report}
    default_search, default_report = bench.eval_pairs(4, 24)  # the committed default still reads
    assert len(default_search) == 8 and len(default_report) == 48


def test_benchmark_bad_arguments_name_the_flag(tmp_path, capsys):
    from diffusers_snapgen.evaluation import save_classifier

    bench = _benchmark()
    data = tmp_path / "eval_prompts.json"
    data.write_text(json.dumps({"seen": ["red apple, noto style", "a cat", "blue car"],
                                "heldout_pair": ["a cat, fluent style", "blue car", "red apple"]}))
    out = ["--out", str(tmp_path / "out")]
    assert bench.main(["default", "--eval-prompts", str(tmp_path / "missing.json"), *out]) == 2
    assert "--eval-prompts" in capsys.readouterr().err
    assert bench.main(["default", "--eval-prompts", str(data), "--report-pairs", "3", "--search-pairs", "1", *out]) == 2
    assert "fewer than --report-pairs 3 + --search-pairs 1" in capsys.readouterr().err
    (tmp_path / "wrong.json").write_text(json.dumps({"train": ["a"]}))
    assert bench.main(["default", "--eval-prompts", str(tmp_path / "wrong.json"), *out]) == 2
    assert "no 'seen' and 'heldout_pair'" in capsys.readouterr().err
    args = ["default", "--eval-prompts", str(data), "--report-pairs", "2", "--search-pairs", "1", *out]
    assert bench.main([*args, "--classifier", str(tmp_path / "c.pt")]) == 2
    assert "--classifier must be a .safetensors" in capsys.readouterr().err
    assert bench.main([*args, "--classifier", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--classifier: classifier" in err and "snapgen eval --train-classifier" in err
    path = save_classifier(_fixed_classifier("a cat", classes=("a cat", "blue car")), tmp_path / "two.safetensors")
    assert bench.main([*args, "--classifier", str(path)]) == 2
    assert "has no class for 2 prompt(s) of --eval-prompts (e.g. 'red apple" in capsys.readouterr().err
    assert bench.main(["paper", "--classifier", str(path), *out]) == 2
    assert "apply to the default model only" in capsys.readouterr().err
    assert bench.main(["paper", "--target-bits", "4.5", *out]) == 2
    assert "--target-bits and --sensitivities-from apply to the default model only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main([*args, "--target-bits", "0.5"])
    assert "--target-bits: must be a number of bits per weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_benchmark_tag_names_the_result_files():
    bench = _benchmark()
    assert bench._stem(bench.parse_args(["default"])) == "coreml_mixed_bit_default"
    assert bench._stem(bench.parse_args(["default", "--tag", "cfg2"])) == "coreml_mixed_bit_default_cfg2"
    tagged = bench.parse_args(["default", "--tag", "cfg2", "--target-bits", "4.5", "--bits", "3,4,6,8"])
    assert bench._stem(tagged) == "coreml_mixed_bit_default_cfg2_4.5bit_3468"
    with pytest.raises(SystemExit):
        bench.parse_args(["default", "--tag", "../x"])
