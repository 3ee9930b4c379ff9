"""Each component converts for iOS17 (iOS18 is covered end to end in test_coreml_export.py); structure, I/O,
per-tensor palettization, the decompress-into-PyTorch round trip, and UNet chunking."""

import pytest
import torch

pytest.importorskip("coremltools")
pytest.importorskip("sklearn")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from diffusers_snapgen import testing  # noqa: E402
from diffusers_snapgen.coreml.compress import decompressed_state_dict, palettize, swapped_parameters  # noqa: E402
from diffusers_snapgen.coreml.components import (  # noqa: E402
    decoder_component,
    text_encoder_component,
    unet_component,
)
from diffusers_snapgen.coreml.convert import convert_module  # noqa: E402
from diffusers_snapgen.coreml.export import _save_variant, export_components  # noqa: E402
from diffusers_snapgen.coreml.validate import check_structure, op_counts, program_ops, psnr  # noqa: E402

SMALL_UNET = dict(block_out_channels=(16, 32), transformer_layers_per_block=(1, 1),
                  only_cross_attention=(True, False), layers_per_block=1)


@pytest.fixture(scope="module")
def unet_ios17():
    unet = testing.tiny_unet(**SMALL_UNET)
    component = unet_component(unet, latent_size=8, sequence_length=6)
    mlmodel, seconds, route = convert_module(component.module, component.inputs, component.output_names, "iOS17")
    return component, mlmodel, route


def test_unet_ios17_structure(unet_ios17):
    component, mlmodel, route = unet_ios17
    assert route == "trace"  # the RoPE tables are keyed by plain ints, so torch.jit.trace works without a fallback
    report = check_structure(mlmodel, "iOS17", expect_sdpa=True)
    assert report["passed"], report["problems"]
    ops = set(program_ops(mlmodel))
    assert "tile" not in ops and "scaled_dot_product_attention" not in ops  # decomposed below iOS18
    assert {"softmax", "matmul", "conv", "linear"} <= ops
    assert report["io"] == {
        "inputs": [
            {"name": "sample", "shape": [1, 4, 8, 8], "dtype": "float16"},
            {"name": "timestep", "shape": [1], "dtype": "float16"},
            {"name": "encoder_hidden_states", "shape": [1, 6, 24], "dtype": "float16"},
            {"name": "pooled_projections", "shape": [1, 20], "dtype": "float16"},
        ],
        "outputs": [{"name": "noise_pred", "shape": [1, 4, 8, 8], "dtype": "float16"}],
    }
    # a wrong I/O expectation and a forbidden op are reported, not ignored
    bad = check_structure(mlmodel, "iOS17", expected_io={"inputs": [{"name": "x", "shape": [1], "dtype": "float16"}]})
    assert not bad["passed"] and "inputs are" in bad["problems"][0]


def test_unet_ios17_palettize8_round_trip(unet_ios17):
    component, mlmodel, _ = unet_ios17
    compressed, info = palettize(mlmodel, component.module, 8, "iOS17", weight_threshold=256)
    assert info["granularity"] == "per_tensor" and info["per_grouped_channel_tensors"] == 0
    assert info["palettized_tensors"] > 20
    assert op_counts(compressed)["constexpr_lut_to_dense"] == info["palettized_tensors"]
    # only parameters are palettized: the RoPE tables (constants, not parameters) are never in the list
    assert all(name.endswith("weight") for name in info["palettized_parameters"])
    state = decompressed_state_dict(compressed, component.module)
    assert set(info["palettized_parameters"]) <= set(state)
    for name in info["palettized_parameters"][:5]:
        assert torch.unique(state[name]).numel() <= 256
    with torch.no_grad():
        reference = component.reference(*component.inputs.values())
        with swapped_parameters(component.module, state):
            out = component.module(*component.inputs.values())
    assert psnr(reference, out) >= 35.0
    with pytest.raises(ValueError, match="`nbits`"):
        palettize(mlmodel, component.module, 5, "iOS17")


def test_unet_chunking(unet_ios17, tmp_path):
    component, mlmodel, _ = unet_ios17
    saved = _save_variant(mlmodel, component, tmp_path / "fp16", chunk=True, target="iOS17")
    assert saved["files"] == ["UnetChunk1.mlpackage", "UnetChunk2.mlpackage"]
    assert sorted(p.name for p in (tmp_path / "fp16").iterdir()) == saved["files"]
    assert all(chunk["structure_passed"] for chunk in saved["chunks"])
    first, second = saved["chunks"]
    assert [f["name"] for f in first["io"]["inputs"]][0] == "sample"
    assert second["io"]["outputs"][0]["name"] == "noise_pred"


def test_decoder_and_text_encoders_ios17(tmp_path):
    latent = 4
    components = [
        decoder_component(testing.tiny_decoder(), latent_size=latent),
        text_encoder_component("text_encoder", testing.tiny_clip_text_encoder(), testing.tiny_clip_tokenizer(),
                               "clip", 16),
        text_encoder_component("text_encoder_3", testing.tiny_t5_encoder(), testing.tiny_t5_tokenizer(), "t5", 12),
    ]
    report = export_components(components, tmp_path, "iOS17", ["fp16"], progress=None)
    decoder = report["components"]["decoder"]
    assert decoder["package"] == "VAEDecoder" and decoder["structure"]["passed"]
    assert decoder["io"]["inputs"] == [{"name": "z", "shape": [1, 4, latent, latent], "dtype": "float16"}]
    assert decoder["io"]["outputs"] == [{"name": "image", "shape": [1, 3, 8 * latent, 8 * latent], "dtype": "float16"}]
    clip = report["components"]["text_encoder"]
    assert clip["io"]["inputs"] == [{"name": "input_ids", "shape": [1, 16], "dtype": "int32"}]
    assert [o["name"] for o in clip["io"]["outputs"]] == ["hidden_embeds", "pooled_outputs"]
    assert [o["name"] for o in report["components"]["text_encoder_3"]["io"]["outputs"]] == ["hidden_embeds"]
    for name, entry in report["variants"]["fp16"]["components"].items():
        assert entry["psnr_db"] >= 50.0, name
        assert (tmp_path / "fp16" / f"{report['components'][name]['package']}.mlpackage").is_dir()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # BERT's float32-min mask constant overflows to -inf in fp16
def test_generic_text_encoder_converts_with_mask(tmp_path):
    component = text_encoder_component(
        "text_encoder", testing.tiny_bert_encoder(), testing.tiny_bert_tokenizer(), "generic", 10
    )
    assert list(component.inputs) == ["input_ids", "attention_mask"]
    report = export_components([component], tmp_path, "iOS18", ["fp16"], progress=None)
    entry = report["components"]["text_encoder"]
    assert [f["name"] for f in entry["io"]["inputs"]] == ["input_ids", "attention_mask"]
    assert report["variants"]["fp16"]["components"]["text_encoder"]["psnr_db"] >= 50.0


def test_saved_package_decompresses_like_the_in_memory_model(tmp_path):
    """A package loaded from disk (no MIL program in memory) goes through coremltools' public
    decompress_weights/get_weights_metadata and gives the very same weights."""
    import coremltools as ct

    component = text_encoder_component(
        "text_encoder", testing.tiny_clip_text_encoder(), testing.tiny_clip_tokenizer(), "clip", 16
    )
    mlmodel, _, _ = convert_module(component.module, component.inputs, component.output_names, "iOS18")
    compressed, info = palettize(mlmodel, component.module, 4, "iOS18", group_size=8, weight_threshold=64)
    assert info["palettized_tensors"] > 5 and info["per_grouped_channel_tensors"] > 0
    compressed.save(str(tmp_path / "TextEncoder.mlpackage"))
    loaded = ct.models.MLModel(str(tmp_path / "TextEncoder.mlpackage"), skip_model_load=True)
    in_memory = decompressed_state_dict(compressed, component.module)
    from_disk = decompressed_state_dict(loaded, component.module)
    assert set(in_memory) == set(from_disk) and set(info["palettized_parameters"]) <= set(from_disk)
    assert all(torch.equal(in_memory[k], from_disk[k]) for k in in_memory)
    for name in info["palettized_parameters"]:  # at most one 16-entry table per group of 8 output channels
        assert torch.unique(from_disk[name]).numel() <= 16 * -(-from_disk[name].shape[0] // 8)


def test_strict_mode_rejects_a_variant_below_35_db(tmp_path):
    component = text_encoder_component(
        "text_encoder", testing.tiny_clip_text_encoder(), testing.tiny_clip_tokenizer(), "clip", 16
    )
    lenient = export_components([component], tmp_path / "lenient", "iOS18", ["palettize4"], group_size=8,
                                weight_threshold=64, progress=None)
    entry = lenient["variants"]["palettize4"]["components"]["text_encoder"]
    assert entry["psnr_db"] < 35.0 and entry["meets_threshold"] is False  # recorded, not hidden
    with pytest.raises(RuntimeError, match="strict"):
        export_components([component], tmp_path / "strict", "iOS18", ["palettize4"], group_size=8,
                          weight_threshold=64, strict=True, progress=None)
    with pytest.raises(TypeError, match="`components`"):
        export_components([component.module], tmp_path / "bad", "iOS18", ["fp16"], progress=None)
