"""Core ML export of SnapGen for iPhone (paper §4: 1024² in ~1.4 s on iPhone 16 Pro Max) and Hub-hosted variants.

Needs the ``coreml`` extra (``coremltools==9.0``, ``scikit-learn``, ``numpy<2.4``). Conversion, palettization and
validation run on Linux; running the packages needs macOS/iOS. Entry points:

- :func:`export_pipeline` -- a :class:`SnapGenPipeline` to ``DIR/packages/<variant>/*.mlpackage`` + manifest + card;
- :func:`export_components` with :func:`unet_component` / :func:`decoder_component` / :func:`text_encoder_component`
  for single models (e.g. the paper-size benchmark);
- :func:`to_ane_unet` -- the Neural-Engine-friendly PyTorch form of the UNet;
- :func:`check_structure`, :func:`psnr`, :func:`palettize`, :func:`decompressed_state_dict` -- the checks;
- :func:`search_mixed_bit`, :func:`load_recipe` -- per-layer palettization widths (``--variants mixed:RECIPE.json``);
- :class:`EndToEndQuality` -- image PSNR of the full sampling with a variant's weights vs fp32;
- :func:`render_coreml_card`, :func:`render_pytorch_card`, :func:`push_folder_to_hub` -- Hub cards and uploads;
- ``snapgen convert-coreml`` / ``python conversion/convert_snapgen_to_coreml.py`` (:mod:`.cli`).

Attributes load lazily, so ``import diffusers_snapgen.coreml`` needs neither coremltools nor a conversion.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ane": ["FP16SafeRMSNorm", "ANESnapGenAttention", "to_ane_unet", "UNetCoreMLWrapper", "DecoderCoreMLWrapper",
            "TextEncoderCoreMLWrapper"],
    "components": ["CoreMLComponent", "unet_component", "decoder_component", "text_encoder_component",
                   "pipeline_components", "COMPONENT_GROUPS"],
    "compress": ["VARIANTS", "palettize", "decompressed_state_dict", "swapped_parameters", "parse_variants"],
    "convert": ["convert_module", "TARGETS"],
    "export": ["export_pipeline", "export_components", "few_step_schedule", "planned_layout", "MANIFEST_NAME"],
    "validate": ["check_structure", "program_ops", "op_counts", "io_spec", "psnr", "package_lut_bits", "ANE_OPS",
                 "FORBIDDEN_OPS", "TEXT_ENCODER_EXTRA_OPS", "ANE_FORM_MIN_PSNR", "COMPRESSED_MIN_PSNR"],
    "cards": ["render_coreml_card", "render_pytorch_card", "push_folder_to_hub", "upload_plan"],
    "mixed_bit": ["MixedBitRecipe", "MixedBitSearch", "search_mixed_bit", "load_recipe", "save_recipe"],
    "quality": ["EndToEndQuality", "image_psnr", "nearest_reference_agreement"],
    "cli": ["add_convert_coreml_parser", "run"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
