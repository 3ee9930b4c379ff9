"""Export a SnapGen pipeline to Core ML packages in the Hub layout of ``apple/coreml-stable-diffusion-*``.

Layout of the output folder (``packages/<variant>/`` mirrors Apple's ``original/packages``)::

    README.md                      model card (hub_cards/coreml_model_card.md)
    coreml_manifest.json           I/O spec, sizes, PSNRs, op counts, versions, deployment target
    scheduler/scheduler_config.json, scheduler/coreml_schedule.json (timesteps and sigmas of the few-step loop)
    tokenizer/ [tokenizer_2/ tokenizer_3/]
    packages/<variant>/{Unet|UnetChunk1+UnetChunk2, VAEDecoder, TextEncoder, TextEncoder2, TextEncoderT5}.mlpackage

Everything is written into a temporary folder next to ``output_dir`` and renamed into place at the end: a failed
step leaves no partial ``output_dir``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ._deps import quiet_progress, require_coremltools
from .compress import (
    MIXED_PREFIX,
    average_bits,
    decompressed_state_dict,
    palettizable_parameters,
    palettize,
    parse_variants,
    swapped_parameters,
    variant_key,
    variant_nbits,
)
from .components import COMPONENT_GROUPS, CoreMLComponent, parse_components, pipeline_components
from .convert import TARGETS, convert_module
from .validate import ANE_FORM_MIN_PSNR, COMPRESSED_MIN_PSNR, check_structure, psnr

__all__ = [
    "MANIFEST_NAME",
    "export_pipeline",
    "export_components",
    "atomic_output_dir",
    "few_step_schedule",
    "planned_layout",
]

MANIFEST_NAME = "coreml_manifest.json"
MANIFEST_VERSION = 1


def _log(progress, message: str) -> None:
    if progress is not None:
        progress(message)


@contextlib.contextmanager
def atomic_output_dir(output_dir, overwrite: bool = False):
    """Yield a temporary folder beside ``output_dir``; rename it to ``output_dir`` only when the block succeeds.

    An existing non-empty ``output_dir`` raises ``FileExistsError`` unless ``overwrite``; it is replaced only
    after the new folder is complete.
    """
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"`output_dir` must be a path, got {type(output_dir).__name__}.")
    target = Path(output_dir).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"`output_dir` {target} exists and is not a folder: choose another path.")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"`output_dir` {target} is not empty: choose a new folder or pass overwrite=True.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(backup)
    staging.rename(target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _run(module, inputs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(*inputs.values())
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _min_psnr(reference: list, test: list) -> float:
    return min(psnr(r, t) for r, t in zip(reference, test))


def _round(value: float):
    """dB values for JSON: rounded; identical outputs (infinite PSNR) as the string ``"inf"``."""
    return "inf" if not np.isfinite(value) else round(float(value), 2)


def _save_variant(mlmodel, component: CoreMLComponent, folder: Path, chunk: bool, target: str) -> dict:
    """Save one package (or its two chunks) into ``folder``; returns ``{"files", "size_bytes", "chunks"}``."""
    ct = require_coremltools()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{component.package}.mlpackage"
    mlmodel.save(str(path))
    if not chunk:
        return {"files": [path.name], "size_bytes": _dir_size(path)}
    chunk_dir = folder / f".{component.package}-chunks"
    with quiet_progress():
        ct.models.utils.bisect_model(str(path), str(chunk_dir), check_output_correctness=False)
    files, chunks = [], []
    for index in (1, 2):
        produced = chunk_dir / f"{component.package}_chunk{index}.mlpackage"
        final = folder / f"{component.package}Chunk{index}.mlpackage"
        produced.rename(final)
        chunk_model = ct.models.MLModel(str(final), skip_model_load=True)
        # bisect_model gives the cut activations fp32 I/O, with a ``cast`` at each boundary
        report = check_structure(chunk_model, target, extra_ops=component.extra_ops | {"cast"})
        chunks.append({"file": final.name, "size_bytes": _dir_size(final), "structure_passed": report["passed"],
                       "problems": report["problems"], "io": report["io"]})
        files.append(final.name)
    shutil.rmtree(chunk_dir, ignore_errors=True)
    shutil.rmtree(path)
    return {"files": files, "size_bytes": sum(c["size_bytes"] for c in chunks), "chunks": chunks}


def _expected_io(component: CoreMLComponent, reference_outputs: list) -> dict:
    def dtype(t):
        return "int32" if not t.is_floating_point() else "float16"

    return {
        "inputs": [{"name": n, "shape": list(t.shape), "dtype": dtype(t)} for n, t in component.inputs.items()],
        "outputs": [
            {"name": n, "shape": list(t.shape), "dtype": "float16"}
            for n, t in zip(component.output_names, reference_outputs)
        ],
    }


def export_components(
    components: list[CoreMLComponent],
    packages_dir,
    target: str = "iOS18",
    variants=("fp16",),
    chunk_unet: bool = False,
    group_size: int = 16,
    weight_threshold: int = 2048,
    validate: bool = True,
    strict: bool = False,
    route: str = "auto",
    palettize_mode: str = "kmeans",
    progress=print,
    quality=None,
) -> dict:
    """Convert, check, compress and save each component into ``packages_dir/<variant>/``.

    Returns ``{"components": {...}, "variants": {...}}`` for the manifest. Raises ``RuntimeError`` when a package
    fails its structure check or the ANE form drifts from the original (PSNR < 60 dB); with ``strict`` also when a
    compressed variant falls below 35 dB. ``validate=False`` skips the PyTorch forward passes of the PSNR checks
    (the structure checks always run). ``mixed:RECIPE.json`` applies a mixed-bit recipe (:mod:`.mixed_bit`);
    components the recipe does not list stay fp16 in that variant, and its tables have the recipe's ``group_size``
    (the one its search measured) rather than ``group_size``. ``quality`` (an
    :class:`~.quality.EndToEndQuality` over the same components) adds each variant's end-to-end image PSNR.
    """
    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {TARGETS}, got {target!r}.")
    variants = parse_variants(variants)
    if not isinstance(components, (list, tuple)) or not all(isinstance(c, CoreMLComponent) for c in components):
        raise TypeError("`components` must be a list of CoreMLComponent (from unet_component, decoder_component, "
                        "text_encoder_component or pipeline_components).")
    packages_dir = Path(packages_dir)
    recipe = _load_mixed_recipe(variants, components)
    report = {"components": {}, "variants": {variant_key(v): {"components": {}} for v in variants}}
    states = {variant_key(v): {} for v in variants}
    for component in components:
        name = component.name
        ane_outputs = _run(component.module, component.inputs)  # also fills caches (RoPE tables) before tracing
        reference_outputs, ane_psnr = ane_outputs, None
        if validate:
            if component.module is not component.reference:
                reference_outputs = _run(component.reference, component.inputs)
            ane_psnr = _min_psnr(reference_outputs, ane_outputs)
            if ane_psnr < ANE_FORM_MIN_PSNR:
                raise RuntimeError(f"[{name}] the Neural-Engine form differs from the model: PSNR {ane_psnr:.1f} dB "
                                   f"< {ANE_FORM_MIN_PSNR} dB. This is a bug in diffusers_snapgen.coreml.")
        if recipe is not None and component.compressible and recipe.for_component(name) is not None:
            recipe.check_component(name, {n for n, p in component.module.named_parameters()  # before converting
                                           if p.ndim >= 2 and p.numel() > weight_threshold})
        _log(progress, f"[{name}] converting to {component.package}.mlpackage ({target}, fp16)")
        mlmodel, seconds, used_route = convert_module(
            component.module, component.inputs, component.output_names, target=target, route=route, warmup=False
        )
        structure = check_structure(mlmodel, target, expect_sdpa=component.expect_sdpa,
                                    extra_ops=component.extra_ops,
                                    expected_io=_expected_io(component, reference_outputs))
        if not structure["passed"]:
            raise RuntimeError(f"[{name}] structure check failed for {target}: {'; '.join(structure['problems'])}")
        _log(progress, f"[{name}] converted in {seconds:.1f}s via {used_route}; structure ok "
                       f"({sum(structure['op_counts'].values())} ops)")
        report["components"][name] = {
            "package": component.package,
            "group": component.group,
            "io": structure["io"],
            "op_counts": structure["op_counts"],
            "structure": {"passed": True, "problems": [], "opset": structure["opset"],
                          "specification_version": structure["specification_version"]},
            "ane_form_psnr_db": None if ane_psnr is None else _round(ane_psnr),
            "conversion_seconds": round(seconds, 2),
            "route": used_route,
            "parameters": sum(p.numel() for p in component.module.parameters()),
            "notes": component.notes,
        }
        eligible = palettizable_parameters(mlmodel, component.module, weight_threshold) if component.compressible \
            else {}
        report["components"][name]["palettizable_weights"] = sum(m["numel"] for m in eligible.values())
        for variant in variants:
            key = variant_key(variant)
            nbits = variant_nbits(variant) if component.compressible else None
            if variant.startswith(MIXED_PREFIX) and component.compressible:
                nbits = recipe.for_component(name)
                if nbits is not None:
                    recipe.check_component(name, eligible)
            compression = {"method": "none"}
            model = mlmodel
            if nbits is not None:
                label = f"{nbits} bits" if isinstance(nbits, int) else f"recipe {Path(recipe.path).name}"
                _log(progress, f"[{name}] palettizing to {label} ({key})")
                start = time.perf_counter()
                groups, eight_bit = group_size, "palette"
                if key == "mixed":  # the tables (and 8-bit kind) the recipe's search measured
                    groups = recipe.metadata.get("group_size", group_size)
                    eight_bit = recipe.metadata.get("eight_bit", "palette")
                model, info = palettize(mlmodel, component.module, nbits, target, groups, weight_threshold,
                                        mode=palettize_mode, eight_bit=eight_bit)
                keep = {"palettized_parameters"} | (set() if key == "mixed" else {"parameter_bits"})
                compression = {"method": "palettization", **{k: v for k, v in info.items() if k not in keep},
                               "seconds": round(time.perf_counter() - start, 2)}
            entry = {"compression": compression}
            if validate:
                state = decompressed_state_dict(model, component.module)
                with swapped_parameters(component.module, state):
                    value = _min_psnr(reference_outputs, _run(component.module, component.inputs))
                entry.update(psnr_db=_round(value), meets_threshold=bool(value >= COMPRESSED_MIN_PSNR),
                             restored_parameters=len(state))
                if quality is not None:
                    states[key][name] = {k: v.half() for k, v in state.items()}
                if strict and value < COMPRESSED_MIN_PSNR:
                    raise RuntimeError(f"[{name}] {key}: output PSNR {value:.1f} dB < {COMPRESSED_MIN_PSNR} dB "
                                       "(strict): drop this variant or lower its compression.")
                _log(progress, f"[{name}] {key}: PSNR {value:.1f} dB vs fp32"
                               + ("" if value >= COMPRESSED_MIN_PSNR else f" (below {COMPRESSED_MIN_PSNR} dB)"))
            chunk = chunk_unet and component.group == "unet"
            saved = _save_variant(model, component, packages_dir / key, chunk, target)
            entry.update({**saved, "files": [f"packages/{key}/{f}" for f in saved["files"]]})
            report["variants"][key]["components"][name] = entry
            _log(progress, f"[{name}] saved packages/{key}/ ({saved['size_bytes'] / 2**20:.1f} MiB)")
    for key, data in report["variants"].items():
        data["size_bytes"] = sum(c["size_bytes"] for c in data["components"].values())
        data.update(_variant_bits(data["components"], report["components"], components))
        if key == "mixed":
            data["recipe"] = {"file": Path(recipe.path).name, **{k: recipe.metadata.get(k) for k in (
                "bar_db", "measured_psnr_db", "average_bits_per_weight", "average_bits_per_weight_with_luts",
                "bits_offered", "group_size", "eight_bit")}}
        if quality is not None and validate:
            data["end_to_end"] = quality.report(states[key])
            _log(progress, f"{key}: end-to-end image PSNR {data['end_to_end']['image_psnr_db']} dB vs fp32")
    if quality is not None and validate:
        report["end_to_end_settings"] = quality.settings()
        _top1_vs_fp16(report["variants"])
    return report


def _top1_vs_fp16(variants: dict) -> None:
    """Each variant's classifier top-1 minus fp16's, in percentage points (when both were measured)."""
    base = (variants.get("fp16", {}).get("end_to_end") or {}).get("classifier_top1")
    if base is None:
        return
    for data in variants.values():
        e2e = data.get("end_to_end") or {}
        if e2e.get("classifier_top1") is not None:
            e2e["classifier_top1_vs_fp16_points"] = round(100 * (e2e["classifier_top1"] - base), 2)


def _load_mixed_recipe(variants, components):
    """The recipe of a ``mixed:`` variant (validated against the component names), or ``None``."""
    from .mixed_bit import load_recipe

    mixed = [v for v in variants if v.startswith(MIXED_PREFIX)]
    if not mixed:
        return None
    recipe = load_recipe(mixed[0][len(MIXED_PREFIX):])
    known = {"unet", "text_encoder", "text_encoder_2", "text_encoder_3"}
    unknown = sorted(set(recipe.layers) - known)
    if unknown:
        raise ValueError(f"mixed-bit recipe {Path(recipe.path).name!r} lists unknown components {unknown}: "
                         f"use {sorted(known)} (recreate it with `snapgen convert-coreml --search-mixed-bit`).")
    exported = {c.name for c in components if c.compressible}
    if exported and not set(recipe.layers) & exported:
        raise ValueError(f"mixed-bit recipe {Path(recipe.path).name!r} covers {sorted(recipe.layers)} but this "
                         f"export compresses {sorted(exported)}: export the recipe's components.")
    return recipe


def _variant_bits(entries: dict, components: dict, specs) -> dict:
    """Average bits per palettizable weight (see ``palettizable_parameters``) of the UNet and of all compressible
    packages together; fp16 weights count 16 bits; ``*_with_luts`` also counts the look-up tables."""
    sizes, bits, with_luts = {}, {}, {}
    for spec in specs:
        if not spec.compressible or spec.name not in entries:
            continue
        weights = components[spec.name]["palettizable_weights"]
        if weights:
            compression = entries[spec.name]["compression"]
            sizes[spec.name] = weights
            bits[spec.name] = compression.get("average_bits_per_weight") or 16.0
            with_luts[spec.name] = compression.get("average_bits_per_weight_with_luts") or 16.0
    out = {"average_bits_per_weight": average_bits({n: bits[n] for n in sizes}, sizes),
           "average_bits_per_weight_with_luts": average_bits({n: with_luts[n] for n in sizes}, sizes)}
    if "unet" in bits:
        out["unet_average_bits_per_weight"] = bits["unet"]
        out["unet_average_bits_per_weight_with_luts"] = with_luts["unet"]
    return out


def few_step_schedule(scheduler, num_inference_steps: int) -> dict:
    """The denoising loop an app runs: timesteps (UNet ``timestep`` input) and sigmas, with the Euler update."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}.")
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_inference_steps)
    return {
        "scheduler": type(scheduler).__name__,
        "num_inference_steps": num_inference_steps,
        "timesteps": [round(float(t), 6) for t in sched.timesteps],
        "sigmas": [round(float(s), 6) for s in sched.sigmas],
        "update": "latents = latents + (sigmas[i + 1] - sigmas[i]) * noise_pred",
        "initial_latents": "standard normal noise (sigma = sigmas[0])",
        "prediction": "flow-matching velocity (noise - x0)",
    }


def _versions() -> dict:
    import diffusers
    import transformers

    import diffusers_snapgen

    ct = require_coremltools()
    return {
        "diffusers_snapgen": diffusers_snapgen.__version__,
        "coremltools": ct.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def export_pipeline(
    pipe,
    output_dir,
    resolution: int = 1024,
    target: str = "iOS18",
    variants=("fp16", "palettize6", "palettize4"),
    components=COMPONENT_GROUPS,
    batch_size: int = 1,
    chunk_unet: bool = False,
    num_inference_steps: int | None = None,
    group_size: int = 16,
    weight_threshold: int = 2048,
    validate: bool = True,
    strict: bool = False,
    model_id: str | None = None,
    license: str = "apache-2.0",
    overwrite: bool = False,
    progress=print,
    end_to_end: bool = True,
    quality_prompts=None,
    quality_seeds=None,
    quality_classifier=None,
    quality_groups=None,
) -> dict:
    """Export ``pipe`` (a :class:`SnapGenPipeline`) to ``output_dir`` in the Hub layout; returns the manifest.

    ``variants``: ``fp16``, ``palettize8``, ``palettize6``, ``palettize4`` (UNet and text encoders are compressed;
    the 1.4M-parameter decoder stays fp16) and ``mixed:RECIPE.json`` (per-layer widths, :mod:`.mixed_bit`).
    ``num_inference_steps`` defaults to the pipeline's sampling default. With ``validate`` and ``end_to_end``
    (and the UNet and, for a pipeline with text encoders, the text packages exported) each variant also gets the
    end-to-end image PSNR of the full sampling against fp32 on ``quality_prompts``/``quality_seeds``
    (:class:`~.quality.EndToEndQuality`; default prompts :data:`~.quality.DEFAULT_QUALITY_PROMPTS`);
    ``quality_classifier`` (an emoji classifier, :func:`diffusers_snapgen.evaluation.load_classifier`) adds the
    classifier top-1 of every variant and its difference to fp16 in points, ``quality_groups`` (one label per
    prompt) the same per group.
    """
    from ..cards import render_coreml_card

    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {TARGETS}, got {target!r}.")
    variants = parse_variants(variants)
    groups = parse_components(components)
    if not isinstance(chunk_unet, bool):
        raise TypeError(f"`chunk_unet` must be a bool, got {type(chunk_unet).__name__}.")
    defaults = pipe.sampling_defaults if hasattr(pipe, "sampling_defaults") else {}
    steps = num_inference_steps if num_inference_steps is not None else defaults.get("num_inference_steps", 4)
    schedule = few_step_schedule(pipe.scheduler, steps) if hasattr(pipe, "scheduler") else None
    if not isinstance(end_to_end, bool):
        raise TypeError(f"`end_to_end` must be a bool, got {type(end_to_end).__name__}.")
    specs = pipeline_components(pipe, resolution, groups, batch_size)
    quality = None
    has_text = getattr(pipe, "text_encoder_mode", None) is not None
    if validate and end_to_end and "unet" in groups and ("text" in groups or not has_text):
        from .quality import EndToEndQuality

        _log(progress, "sampling the fp32 reference images of the end-to-end check")
        quality = EndToEndQuality(pipe, specs, resolution, quality_prompts, quality_seeds,
                                  classifier=quality_classifier, groups=quality_groups)
    guidance = float(defaults.get("guidance_scale", 1.0))
    if batch_size == 1 and guidance > 1.0:
        _log(progress, f"note: the model's default guidance scale is {guidance}; a batch-1 UNet needs two calls per "
                       "step for CFG (export with batch_size=2 to batch them)")
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        report = export_components(specs, staging / "packages", target, variants, chunk_unet, group_size,
                                   weight_threshold, validate, strict, progress=progress, quality=quality)
        tokenizers = []
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            tokenizer = getattr(pipe, name, None)
            if tokenizer is not None and "text" in groups:
                tokenizer.save_pretrained(str(staging / name))
                _write_bpe_files(staging / name)
                tokenizers.append(name)
        pipe.scheduler.save_config(str(staging / "scheduler"))
        (staging / "scheduler" / "coreml_schedule.json").write_text(json.dumps(schedule, indent=2) + "\n")
        manifest = {
            "format_version": MANIFEST_VERSION,
            "model_id": _public_model_id(model_id),
            "pipeline": type(pipe).__name__,
            "deployment_target": target,
            "compute_precision": "float16",
            "resolution": resolution,
            "latent_size": resolution // pipe.vae_scale_factor,
            "batch_size": batch_size,
            "guidance_scale": guidance,
            "chunked_unet": chunk_unet,
            "layout": "packages/<variant>/<Package>.mlpackage",
            "thresholds_db": {"ane_form": ANE_FORM_MIN_PSNR, "compressed": COMPRESSED_MIN_PSNR},
            "validated": validate,
            "versions": _versions(),
            "scheduler": {"config": "scheduler/scheduler_config.json",
                          "schedule": "scheduler/coreml_schedule.json", **schedule},
            "tokenizers": tokenizers,
            "text_conditioning": _text_conditioning(pipe),
            **report,
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
        card = render_coreml_card(manifest, model_id=model_id, license=license)
        card.save(str(staging / "README.md"))
        _log(progress, f"wrote {len(variants)} variant(s) to {Path(output_dir)}")
    return manifest


def _write_bpe_files(folder: Path) -> None:
    """Also write ``vocab.json`` + ``merges.txt`` for a BPE ``tokenizer.json`` (what Apple's Swift ``BPETokenizer``
    reads), when ``save_pretrained`` wrote only the fast-tokenizer file."""
    source = folder / "tokenizer.json"
    if not source.is_file() or (folder / "vocab.json").exists():
        return
    model = json.loads(source.read_text()).get("model", {})
    if model.get("type") != "BPE":
        return
    (folder / "vocab.json").write_text(json.dumps(model.get("vocab", {}), ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges))


def _text_conditioning(pipe) -> dict:
    """How an app assembles the UNet's ``encoder_hidden_states`` / ``pooled_projections`` from the text packages
    (as :class:`SnapGenPipeline.encode_prompt` does)."""
    mode = getattr(pipe, "text_encoder_mode", None)
    joint = pipe.unet.config.joint_attention_dim
    pooled = pipe.unet.config.pooled_projection_dim
    if mode == "sd3":
        t5 = "TextEncoderT5.hidden_embeds" if getattr(pipe, "text_encoder_3", None) is not None else "zeros"
        return {
            "mode": "sd3",
            "encoder_hidden_states": f"concat(concat(TextEncoder.hidden_embeds, TextEncoder2.hidden_embeds, "
                                     f"axis=-1) zero-padded to {joint}, {t5} zero-padded to {joint}; axis=1)",
            "pooled_projections": f"concat(TextEncoder.pooled_outputs, TextEncoder2.pooled_outputs, axis=-1) "
                                  f"zero-padded to {pooled}",
            "t5_sequence_length": pipe._resolve_max_sequence_length(None),
        }
    if mode == "generic":
        return {
            "mode": "generic",
            "encoder_hidden_states": f"TextEncoder.hidden_embeds zero-padded to {joint}",
            "pooled_projections": f"TextEncoder.pooled_outputs zero-padded to {pooled}",
        }
    return {"mode": None, "note": "no text encoder: the app provides encoder_hidden_states and pooled_projections"}


def planned_layout(pipe, variants=("fp16",), components=COMPONENT_GROUPS, chunk_unet: bool = False) -> list[str]:
    """What :func:`export_pipeline` would write for ``pipe``, without converting anything (for ``--dry-run``)."""
    from .components import _text_specs

    variants = parse_variants(variants)
    groups = parse_components(components)
    packages = [p for name, _, _ in _text_specs(pipe) if "text" in groups
                for p in [{"text_encoder": "TextEncoder", "text_encoder_2": "TextEncoder2",
                           "text_encoder_3": "TextEncoderT5"}[name]]]
    if "text" in groups and not packages:
        raise ValueError("`components` includes 'text' but the pipeline has no text encoder: drop 'text'.")
    if "unet" in groups:
        packages += ["UnetChunk1", "UnetChunk2"] if chunk_unet else ["Unet"]
    if "decoder" in groups:
        packages.append("VAEDecoder")
    files = ["README.md", MANIFEST_NAME, "scheduler/scheduler_config.json", "scheduler/coreml_schedule.json"]
    if "text" in groups:
        files += [f"{name}/" for name in ("tokenizer", "tokenizer_2", "tokenizer_3") if getattr(pipe, name, None)]
    files += [f"packages/{v}/{p}.mlpackage" for v in variants for p in packages]
    return files


def _public_model_id(model_id):
    """A Hub repo id as given; a local path reduced to its folder name (no local paths in a published manifest)."""
    if not model_id:
        return None
    model_id = str(model_id)
    if model_id.count("/") == 1 and not os.path.exists(model_id):
        return model_id
    return Path(model_id).name


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (frozenset, set, tuple)):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
