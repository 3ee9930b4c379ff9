"""Saving and loading through diffusers' entry points, from folders and from an offline Hub-layout cache."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import diffusers
import huggingface_hub
import pytest
import torch
from conftest import build_hub_cache
from diffusers import AutoModel, AutoPipelineForText2Image, DiffusionPipeline

from diffusers_snapgen import SnapGenPipeline, SnapGenUNet2DModel, TinyDecoder
from diffusers_snapgen.testing import tiny_pipeline

_repo_numbers = itertools.count()


def new_repo_id() -> str:
    return f"snapgen-test/tiny-snapgen-{next(_repo_numbers)}"


def latents(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red apple", height=32, width=32, generator=torch.Generator().manual_seed(0),
                output_type="latent").images


@pytest.fixture(scope="module")
def reference_latents():
    return latents(tiny_pipeline("clip", "tiny"))  # same seeds as the saved pipeline


def test_model_index_records_the_short_library_name(saved_pipeline):
    index = json.loads((saved_pipeline / "model_index.json").read_text())
    assert index["_class_name"] == "SnapGenPipeline"
    assert index["unet"] == ["diffusers_snapgen", "SnapGenUNet2DModel"]
    assert index["vae"] == ["diffusers_snapgen", "TinyDecoder"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder_3"] == [None, None]
    scheduler = json.loads((saved_pipeline / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 3.0 and scheduler["_snapgen_defaults"]["num_inference_steps"] == 2
    assert list((saved_pipeline / "unet").glob("*.safetensors"))


def test_library_name_does_not_depend_on_the_module_path(monkeypatch):
    pipe = tiny_pipeline("none")
    monkeypatch.setattr(SnapGenUNet2DModel, "__module__", "diffusers_snapgen.moved.elsewhere")
    pipe.register_modules(unet=pipe.unet)
    assert pipe.config.unet == ("diffusers_snapgen", "SnapGenUNet2DModel")


@pytest.mark.parametrize(
    "load", [DiffusionPipeline.from_pretrained, AutoPipelineForText2Image.from_pretrained,
             SnapGenPipeline.from_pretrained],
    ids=["DiffusionPipeline", "AutoPipelineForText2Image", "SnapGenPipeline"],
)
def test_pipeline_loads_through_diffusers(saved_pipeline, reference_latents, load):
    pipe = load(saved_pipeline)
    assert type(pipe) is SnapGenPipeline
    assert type(pipe.unet) is SnapGenUNet2DModel and type(pipe.vae) is TinyDecoder
    torch.testing.assert_close(latents(pipe), reference_latents)


def test_automodel_returns_our_models(saved_pipeline):
    folder = str(saved_pipeline)  # diffusers 0.42.1's AutoModel fails on PathLike (joins it into a str)
    assert type(AutoModel.from_pretrained(folder, subfolder="unet")) is SnapGenUNet2DModel
    assert type(AutoModel.from_pretrained(folder, subfolder="vae")) is TinyDecoder
    assert type(AutoModel.from_pretrained(f"{folder}/unet")) is SnapGenUNet2DModel


def test_autoencoder_kl_pipeline_round_trip(tmp_path):
    pipe = tiny_pipeline("generic", "kl")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["text_encoder"] == ["transformers", "BertModel"]
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.vae) is diffusers.AutoencoderKL and loaded.text_encoder_mode == "generic"
    torch.testing.assert_close(latents(loaded), latents(pipe))


@pytest.mark.parametrize("with_tree_listing", [False, True], ids=["snapshot-only", "with-tree-listing"])
def test_hub_repo_id_loads_offline_from_the_cache(saved_pipeline, reference_latents, with_tree_listing):
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # set by conftest: nothing can be downloaded
    repo_id = new_repo_id()
    build_hub_cache(saved_pipeline, repo_id, with_tree_listing=with_tree_listing)
    for load in (DiffusionPipeline.from_pretrained, AutoPipelineForText2Image.from_pretrained,
                 SnapGenPipeline.from_pretrained):
        pipe = load(repo_id)
        assert type(pipe) is SnapGenPipeline
    torch.testing.assert_close(latents(pipe), reference_latents)
    assert pipe.name_or_path == repo_id
    assert type(AutoModel.from_pretrained(repo_id, subfolder="unet")) is SnapGenUNet2DModel


def test_hub_loading_needs_the_pipelines_registration(saved_pipeline, monkeypatch):
    """Why ``diffusers.pipelines.diffusers_snapgen`` is set: diffusers' Hub path refuses unknown libraries."""
    repo_id = new_repo_id()
    build_hub_cache(saved_pipeline, repo_id, with_tree_listing=True)
    monkeypatch.delattr(diffusers.pipelines, "diffusers_snapgen")
    with pytest.raises(ValueError, match="diffusers/pipelines"):
        DiffusionPipeline.from_pretrained(repo_id)


def _pickle_only_unet(folder):
    unet = SnapGenUNet2DModel.from_pretrained(folder / "unet")
    for file in (folder / "unet").glob("*.safetensors"):
        file.unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert list((folder / "unet").glob("*.bin"))


@pytest.mark.parametrize(
    "load", [DiffusionPipeline.from_pretrained, AutoPipelineForText2Image.from_pretrained,
             SnapGenPipeline.from_pretrained],
    ids=["DiffusionPipeline", "AutoPipelineForText2Image", "SnapGenPipeline"],
)
def test_every_pipeline_entry_point_refuses_pickle_weights(pipeline_copy, load):
    _pickle_only_unet(pipeline_copy)
    with pytest.raises(ValueError, match="'unet'.*pickle.*use_safetensors=False"):
        load(pipeline_copy)


@pytest.mark.parametrize("opt_in", [False, None], ids=["False", "None"])
def test_pickle_weights_load_after_an_explicit_opt_in(pipeline_copy, reference_latents, opt_in):
    _pickle_only_unet(pipeline_copy)
    # safetensors are still read where present (the other components), the pickle where there is nothing else
    for load in (SnapGenPipeline.from_pretrained, AutoPipelineForText2Image.from_pretrained):
        torch.testing.assert_close(latents(load(pipeline_copy, use_safetensors=opt_in)), reference_latents)


# ----------------------------------------------------------------------------------- text encoding only


@pytest.mark.parametrize("load", [DiffusionPipeline.from_pretrained, SnapGenPipeline.from_pretrained],
                         ids=["DiffusionPipeline", "SnapGenPipeline"])
def test_prompts_encode_without_unet_and_vae_exactly_as_in_the_full_pipeline(saved_pipeline, load):
    """diffusers' usual way to precompute embeddings: load without the denoiser and decoder. The CLIP widths of the
    tiny set (16 + 12) are narrower than the UNet's joint width (32), so this also checks the padding."""
    full = SnapGenPipeline.from_pretrained(saved_pipeline)
    text_only = load(str(saved_pipeline), unet=None, vae=None)
    assert text_only.unet is None and text_only.vae is None
    kwargs = dict(prompt=["a red apple", "snow"], negative_prompt="blurry", num_images_per_prompt=2,
                  do_classifier_free_guidance=True)
    expected, got = full.encode_prompt(**kwargs), text_only.encode_prompt(**kwargs)
    for want, have in zip(expected, got):
        assert want.shape[-1] in (32, 20)  # padded to the UNet's widths
        torch.testing.assert_close(have, want, rtol=0, atol=0)
    # and the full pipeline accepts them unchanged
    embeds, negative, pooled, negative_pooled = got
    image = full(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                 negative_pooled_prompt_embeds=negative_pooled, guidance_scale=2.0, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert image.shape == (4, 4, 4, 4) and torch.isfinite(image).all()
    with pytest.raises(ValueError, match="without `unet`"):
        text_only("a red apple")


# ----------------------------------------------------------------------------------- no local paths


def test_save_pretrained_records_no_local_path(saved_pipeline, tmp_path):
    pipe = SnapGenPipeline.from_pretrained(saved_pipeline)
    assert pipe.unet.config._name_or_path == str(saved_pipeline / "unet")  # diffusers records where it loaded from
    pipe.save_pretrained(tmp_path / "resaved")
    for path in (tmp_path / "resaved").rglob("*.json"):
        text = path.read_text()
        assert str(saved_pipeline) not in text and "_name_or_path" not in json.loads(text), path
    assert pipe.unet.config._name_or_path == str(saved_pipeline / "unet")  # the live config is unchanged
    # a Hub id is not a local path and is kept
    pipe.unet.register_to_config(_name_or_path="org/model")
    pipe.save_pretrained(tmp_path / "hub-named")
    assert json.loads((tmp_path / "hub-named" / "unet" / "config.json").read_text())["_name_or_path"] == "org/model"


def _absolute_paths(value):
    if isinstance(value, dict):
        return [p for v in value.values() for p in _absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _absolute_paths(v)]
    if isinstance(value, str) and re.match(r"^(/[^/\s]+/|~/|[A-Za-z]:[\\/])", value):
        return [value]
    return []


def test_shipped_and_committed_json_holds_no_absolute_path():
    """Package data (the default model's configs) and committed results must not record a build machine's paths."""
    root = Path(__file__).parents[1]
    files = sorted([*(root / "src").rglob("*.json"), *(root / "benchmarks" / "results").rglob("*.json")])
    assert any("default_model" in str(f) for f in files)
    found = {str(f.relative_to(root)): _absolute_paths(json.loads(f.read_text())) for f in files}
    assert not {k: v for k, v in found.items() if v}


# ----------------------------------------------------------------------------------- bad input, table-driven


def _empty_folder(folder):
    empty = folder.parent / "empty"
    empty.mkdir()
    return empty


def _other_pipeline(folder):
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusion3Pipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _broken_index(folder):
    (folder / "model_index.json").write_text("{not json")
    return folder


def _garbage_safetensors(folder):
    next((folder / "unet").glob("*.safetensors")).write_bytes(b"this is not a safetensors file" * 4)
    return folder


def _truncated_safetensors(folder):
    path = next((folder / "text_encoder").glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:-100])
    return folder


LOAD_CASES = [
    ("no-model-index", _empty_folder, ValueError, "model_index.json"),
    ("not-a-snapgen-pipeline", _other_pipeline, ValueError, "StableDiffusion3Pipeline"),
    ("model-index-not-json", _broken_index, ValueError, "JSON"),
    ("corrupt-safetensors", _garbage_safetensors, ValueError, "safetensors"),
    ("truncated-safetensors", _truncated_safetensors, ValueError, "safetensors"),
    ("missing-local-path", lambda folder: "./no/such/folder", ValueError, "not a folder"),
    ("repo-not-in-cache", lambda folder: "snapgen-test/not-cached", ValueError, "cache"),
    ("not-a-path", lambda folder: 123, TypeError, "folder path"),
]


@pytest.mark.parametrize("prepare, error, needle", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_bad_pipeline_sources_are_named(pipeline_copy, prepare, error, needle):
    source = prepare(pipeline_copy)
    with pytest.raises(error) as info:
        SnapGenPipeline.from_pretrained(source)
    assert "pretrained_model_name_or_path" in str(info.value) and needle in str(info.value)
