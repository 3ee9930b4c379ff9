"""Model cards (``huggingface_hub.ModelCard`` from the ``hub_cards/`` templates) and Hub uploads.

Two templates: ``coreml_model_card.md`` for the Core ML repos written by :func:`export_pipeline` and
``pytorch_model_card.md`` for the diffusers repos the training examples push (pipeline, UNet, tiny decoder,
autoencoder or SD3 transformer teacher).
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

__all__ = [
    "PAPER_URL",
    "hub_cards_dir",
    "render_coreml_card",
    "render_pytorch_card",
    "upload_plan",
    "push_folder_to_hub",
]

PAPER_URL = "https://arxiv.org/abs/2412.09619"
#: ``library_name`` of the Core ML repos (Apple's ``coreml-stable-diffusion-*`` repos are tagged ``coreml``).
COREML_LIBRARY_NAME = "coreml"
PYTORCH_KINDS = {
    "pipeline": ("SnapGen text-to-image pipeline", "text-to-image"),
    "unet": ("SnapGen UNet", "text-to-image"),
    "tiny_decoder": ("SnapGen tiny decoder", None),
    "tiny_encoder": ("SnapGen tiny encoder", None),
    "autoencoder": ("SnapGen-compatible autoencoder", None),
    "transformer": ("SD3 transformer", None),
    "lora": ("SnapGen LoRA", "text-to-image"),
}
STAGES = {
    "pretrain": ("train_snapgen.py", "flow-matching pre-training (paper §3.3)"),
    "kd": ("train_snapgen_kd.py", "multi-level knowledge distillation with timestep-aware scaling (paper §3.3)"),
    "asd": ("train_snapgen_asd.py", "adversarial step distillation, few-step (paper §3.4)"),
    "tiny_decoder": ("train_tiny_decoder.py", "tiny decoder training: MSE + LPIPS + adversarial (paper §3.2)"),
    "tiny_encoder": ("train_tiny_encoder.py", "tiny encoder distillation: latent MSE to an autoencoder's mean"),
    "autoencoder": ("train_autoencoder.py", "autoencoder training: L1/MSE + KL + LPIPS + adversarial (SD3 latents)"),
    "teacher": ("train_sd3_teacher.py", "teacher training: flow matching of an SD3Transformer2DModel (paper §3.3)"),
    "lora": ("train_snapgen_lora.py", "LoRA fine-tuning: flow matching of a low-rank adapter on the frozen UNet"),
}


def hub_cards_dir() -> Path:
    """The folder of the model-card templates: package data (``diffusers_snapgen/hub_cards/``; the repository's
    top-level ``hub_cards/`` links to it), so wheel installs find them too."""
    folder = Path(__file__).resolve().parent / "hub_cards"
    if not (folder / "coreml_model_card.md").is_file():
        raise FileNotFoundError(
            f"Model-card templates not found in {folder}: reinstall diffusers-snapgen or pass `template_path`."
        )
    return folder


def _is_repo_id(value) -> bool:
    return isinstance(value, str) and value.count("/") == 1 and not os.path.exists(value) and " " not in value


def _check_license(license) -> None:
    if not isinstance(license, str) or not license.strip():
        raise ValueError(f"`license` must be a license identifier such as 'apache-2.0', got {license!r}.")


def _fmt_io(features: list) -> str:
    return "<br>".join(f"`{f['name']}` {f['dtype']} {tuple(f['shape'])}" for f in features)


def render_coreml_card(manifest: dict, model_id: str | None = None, license: str = "apache-2.0",
                       template_path=None) -> ModelCard:
    """The README of a Core ML export, from its manifest: YAML (``library_name``, ``pipeline_tag: text-to-image``,
    tags ``coreml``/``snapgen``, license, base model), variant table, I/O table and a Swift 4-step loop."""
    if not isinstance(manifest, dict) or "variants" not in manifest or "components" not in manifest:
        raise ValueError("`manifest` must be the dict returned by export_pipeline (with 'variants' and 'components').")
    _check_license(license)
    components = manifest["components"]
    names = list(components)
    rows = []
    for variant, data in manifest["variants"].items():
        cells = []
        for name in names:
            entry = data["components"].get(name, {})
            value = entry.get("psnr_db")
            mark = "" if entry.get("meets_threshold", True) else " ⚠"
            cells.append("—" if value is None else f"{value} dB{mark}")
        bits = data.get("average_bits_per_weight")
        e2e = data.get("end_to_end") or {}
        agreement = e2e.get("nearest_reference_agreement")
        top1, points = e2e.get("classifier_top1"), e2e.get("classifier_top1_vs_fp16_points")
        rows.append({"name": variant, "size": f"{data['size_bytes'] / 2**20:.1f} MiB", "cells": cells,
                     "bits": "—" if bits is None else f"{bits:.2f}",
                     "end_to_end": "—" if not e2e else f"{e2e['image_psnr_db']} dB",
                     "agreement": "—" if agreement is None else f"{agreement * 100:.0f}%",
                     "top1": "—" if top1 is None else f"{top1 * 100:.1f}%"
                     + ("" if points is None else f" ({points:+.1f})")})
    io_rows = [{"package": c["package"], "inputs": _fmt_io(c["io"]["inputs"]), "outputs": _fmt_io(c["io"]["outputs"])}
               for c in components.values()]
    unet_inputs = {f["name"]: f["shape"] for f in components.get("unet", {}).get("io", {}).get("inputs", [])}
    sample = unet_inputs.get("sample", [manifest.get("batch_size", 1), 16, manifest["latent_size"], 0])
    hidden = unet_inputs.get("encoder_hidden_states", [0, 333, 4096])
    pooled = unet_inputs.get("pooled_projections", [0, 2048])
    decoder_notes = components.get("decoder", {}).get("notes", {})
    schedule = manifest.get("scheduler", {})
    base_model = model_id if _is_repo_id(model_id) else None
    card_data = ModelCardData(
        library_name=COREML_LIBRARY_NAME,
        pipeline_tag="text-to-image",
        license=license,
        base_model=base_model,
        tags=["coreml", "snapgen", "text-to-image", "ios", manifest["deployment_target"]],
    )
    kwargs = dict(
        title=f"SnapGen Core ML ({manifest['deployment_target']}, {manifest['resolution']}px)",
        paper_url=PAPER_URL,
        model_id=base_model,
        target=manifest["deployment_target"],
        resolution=manifest["resolution"],
        latent_size=manifest["latent_size"],
        batch_size=manifest["batch_size"],
        guidance_scale=manifest.get("guidance_scale", 1.0),
        num_inference_steps=schedule.get("num_inference_steps", 4),
        timesteps=", ".join(f"{t:g}" for t in schedule.get("timesteps", [])),
        sigmas=", ".join(f"{s:g}" for s in schedule.get("sigmas", [])),
        latent_channels=sample[1],
        sequence_length=hidden[1],
        joint_dim=hidden[2],
        pooled_dim=pooled[1],
        scaling_factor=decoder_notes.get("scaling_factor", 1.5305),
        shift_factor=decoder_notes.get("shift_factor", 0.0609),
        component_names=names,
        variant_rows=rows,
        end_to_end=manifest.get("end_to_end_settings"),
        variant_names=list(manifest["variants"]),
        io_rows=io_rows,
        versions=manifest.get("versions", {}),
    )
    path = template_path or hub_cards_dir() / "coreml_model_card.md"
    return ModelCard.from_template(card_data, template_path=str(path), **kwargs)


def render_pytorch_card(
    kind: str,
    stage: str,
    repo_id: str,
    base_model: str | None = None,
    license: str = "apache-2.0",
    training: dict | None = None,
    datasets: list[str] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    subfolder: str | None = None,
    notes: str | None = None,
    template_path=None,
    prompt: str | None = None,
) -> ModelCard:
    """The README of a PyTorch repo pushed by a training example.

    ``kind``: one of ``PYTORCH_KINDS`` (``"pipeline"``, ``"unet"``, ``"tiny_decoder"``, ``"tiny_encoder"``, ...);
    ``stage``: one of ``STAGES`` (``"pretrain"``, ``"kd"``, ``"asd"``, ...); ``training``:
    hyper-parameters shown as a table (e.g. ``{"steps": 1000, "lr": 1e-4}``); ``prompt``: the prompt of the usage
    example (a DreamBooth LoRA's instance prompt).
    """
    if kind not in PYTORCH_KINDS:
        raise ValueError(f"`kind` must be one of {tuple(PYTORCH_KINDS)}, got {kind!r}.")
    if stage not in STAGES:
        raise ValueError(f"`stage` must be one of {tuple(STAGES)}, got {stage!r}.")
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"`repo_id` must be the Hub repo id the card describes (e.g. 'me/snapgen'), got {repo_id!r}.")
    if training is not None and not isinstance(training, dict):
        raise TypeError(f"`training` must be a dict of settings, got {type(training).__name__}.")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError(f"`prompt` must be a non-empty string or None, got {prompt!r}.")
    _check_license(license)
    title, pipeline_tag = PYTORCH_KINDS[kind]
    script, stage_label = STAGES[stage]
    kind_tags = {"tiny_decoder": ["vae", "tiny-decoder"], "tiny_encoder": ["vae", "tiny-encoder"],
                 "autoencoder": ["vae", "autoencoder-kl"],
                 "transformer": ["sd3", "mmdit", "teacher"]}
    tags = ["snapgen", "diffusers", "safetensors"] + (["text-to-image"] if pipeline_tag else kind_tags[kind])
    if kind == "lora":
        tags += ["lora", "template:sd-lora"]
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        license=license,
        base_model=base_model,
        datasets=datasets,
        tags=tags,
    )
    summaries = {
        "pipeline": "A SnapGen text-to-image pipeline: the 379M-parameter efficient UNet, flow-matching Euler sampling "
                    "and the tiny decoder, loadable with diffusers.",
        "unet": "The SnapGen efficient UNet (paper §3.1), a drop-in `unet` for `SnapGenPipeline`.",
        "tiny_decoder": "SnapGen's 1.4M-parameter tiny decoder for SD3 latents (paper §3.2); also a fast drop-in "
                        "decoder for diffusers' SD3 pipelines.",
        "tiny_encoder": "A tiny image encoder for SnapGen's latent space (the counterpart of the tiny decoder, paper "
                        "§3.2): it gives the posterior mean of the autoencoder it was distilled from, so pipelines "
                        "that ship only a tiny decoder can be fine-tuned.",
        "autoencoder": "A diffusers `AutoencoderKL` with SD3's latent layout (16 channels, f = 8), the encoder/decoder "
                       "of a small SnapGen; its config carries the measured `scaling_factor` and `shift_factor` (SD3 "
                       "convention: `(z - shift_factor) * scaling_factor`).",
        "transformer": "A diffusers `SD3Transformer2DModel` (MMDiT) trained with flow matching on the latents and text "
                       "encoding of a SnapGen base pipeline: the teacher of SnapGen's knowledge distillation and "
                       "adversarial step distillation (paper §3.3-3.4), sampled through `SnapGenPipeline`.",
        "lora": "LoRA weights for a SnapGen UNet (diffusers' LoRA layout, `pytorch_lora_weights.safetensors`): load "
                "them into the base `SnapGenPipeline` with `load_lora_weights`.",
    }
    rows = sorted((str(k), str(v)) for k, v in (training or {}).items())
    kwargs = dict(
        title=f"{title} ({stage_label.split(' (')[0]})",
        summary=summaries[kind],
        kind=kind,
        script=script,
        stage_label=stage_label,
        paper_url=PAPER_URL,
        base_model=base_model,
        repo_id=repo_id,
        subfolder=subfolder,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        training_rows=rows,
        notes=notes,
        prompt=prompt or "a red apple on a wooden table",
    )
    path = template_path or hub_cards_dir() / "pytorch_model_card.md"
    return ModelCard.from_template(card_data, template_path=str(path), **kwargs)


def upload_plan(folder) -> list[str]:
    """Files of ``folder`` that an upload sends, as sorted POSIX paths relative to it (hidden files excluded)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"`folder` {root} is not a folder: export first, then push.")
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def push_folder_to_hub(folder, repo_id: str, dry_run: bool = False, private: bool | None = None, token=None,
                       commit_message: str = "Add SnapGen Core ML packages", progress=print):
    """Upload ``folder`` to the model repo ``repo_id`` with ``HfApi.upload_folder`` (the repo is created if needed).

    With ``dry_run`` nothing is sent: returns the list of files that would go. Otherwise returns the commit info.
    """
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or " " in repo_id:
        raise ValueError(f"`repo_id` must look like 'user/name', got {repo_id!r}.")
    files = upload_plan(folder)
    if dry_run:
        if progress is not None:
            progress(f"dry run: would upload {len(files)} files to https://huggingface.co/{repo_id}")
            for name in files:
                progress(f"  {name}")
        return files
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if progress is not None:
        progress(f"uploading {len(files)} files to https://huggingface.co/{repo_id}")
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                             commit_message=commit_message, ignore_patterns=[".*", "**/.*"])
