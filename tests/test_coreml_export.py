"""End-to-end export of a tiny SnapGen pipeline for iOS18 (fp16, 6- and 4-bit), the Hub folder, the manifest,
the model card, the CLI (``snapgen convert-coreml`` / conversion script) and Hub uploads (mocked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

pytest.importorskip("coremltools")
pytest.importorskip("sklearn")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")

from diffusers_snapgen import cards as cards_module  # noqa: E402
from diffusers_snapgen.coreml import export as export_module  # noqa: E402
from diffusers_snapgen.cards import push_folder_to_hub, upload_plan  # noqa: E402
from diffusers_snapgen.coreml.export import MANIFEST_NAME, export_pipeline, planned_layout  # noqa: E402
from diffusers_snapgen.testing import tiny_pipeline  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_UNET = dict(block_out_channels=(16, 32), transformer_layers_per_block=(1, 1),
                  only_cross_attention=(True, False), layers_per_block=1)
VARIANTS = ["fp16", "palettize6", "palettize4"]


def _pipe(**kwargs):
    return tiny_pipeline(**SMALL_UNET, **kwargs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export shared by all pytest-xdist workers (the first one converts, the others wait and reuse it)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "snapgen-coreml-export"
    out = shared / "snapgen-coreml"
    log = shared / "progress.json"
    shared.mkdir(exist_ok=True)
    with FileLock(str(shared) + ".lock"):
        if not log.is_file():
            messages = []
            export_pipeline(_pipe(), out, resolution=64, target="iOS18", variants=VARIANTS, group_size=8,
                            weight_threshold=256, model_id="someone/snapgen-tiny", progress=messages.append)
            log.write_text(json.dumps(messages))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    return _pipe(), out, manifest, json.loads(log.read_text())


def _files(root: Path) -> set:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_folder_layout_is_complete(exported):
    pipe, out, manifest, _ = exported
    planned = planned_layout(pipe, VARIANTS)
    files = _files(out)
    for entry in planned:
        assert any(f == entry or f.startswith(entry.rstrip("/") + "/") for f in files), entry
    packages = sorted(p.relative_to(out).as_posix() for p in out.glob("packages/*/*.mlpackage"))
    assert packages == sorted(e for e in planned if e.endswith(".mlpackage"))
    assert len(packages) == 3 * 4  # TextEncoder, TextEncoder2, Unet, VAEDecoder per variant
    assert {"tokenizer/tokenizer.json", "tokenizer/vocab.json", "tokenizer/merges.txt"} <= files
    assert not list(out.parent.glob(".*partial*"))  # no staging folder left behind
    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    assert on_disk["deployment_target"] == "iOS18" and on_disk["resolution"] == 64 and on_disk["latent_size"] == 8


def test_manifest_structure_and_io(exported):
    _, _, manifest, _ = exported
    unet = manifest["components"]["unet"]
    assert unet["structure"]["passed"] and unet["structure"]["opset"] == "CoreML8"
    assert unet["op_counts"]["scaled_dot_product_attention"] >= 1
    assert "tile" not in unet["op_counts"] and "softmax" not in unet["op_counts"]
    assert unet["ane_form_psnr_db"] >= 60.0
    assert [f["name"] for f in unet["io"]["inputs"]] == ["sample", "timestep", "encoder_hidden_states",
                                                         "pooled_projections"]
    assert unet["io"]["inputs"][2]["shape"] == [1, 16 + 256, 32]  # CLIP tokens + T5 zeros, joint width
    assert unet["io"]["outputs"] == [{"name": "noise_pred", "shape": [1, 4, 8, 8], "dtype": "float16"}]
    assert manifest["components"]["decoder"]["io"]["outputs"][0]["shape"] == [1, 3, 64, 64]
    assert set(manifest["components"]) == {"text_encoder", "text_encoder_2", "unet", "decoder"}
    for key in ("coremltools", "torch", "numpy", "diffusers_snapgen"):
        assert manifest["versions"][key]
    assert manifest["text_conditioning"]["mode"] == "sd3"


def test_variant_psnr_and_sizes(exported):
    _, _, manifest, _ = exported
    variants = manifest["variants"]
    for name, entry in variants["fp16"]["components"].items():
        assert entry["psnr_db"] >= 50.0 and entry["meets_threshold"], name
    unet6 = variants["palettize6"]["components"]["unet"]
    assert unet6["psnr_db"] >= 35.0 and unet6["meets_threshold"]
    assert unet6["compression"]["granularity"] == "per_grouped_channel"
    assert unet6["compression"]["per_grouped_channel_tensors"] == unet6["compression"]["palettized_tensors"] > 20
    for variant in ("palettize6", "palettize4"):
        for entry in variants[variant]["components"].values():  # the flag always agrees with the number
            assert entry["meets_threshold"] == (entry["psnr_db"] >= 35.0)
    assert variants["palettize4"]["components"]["unet"]["psnr_db"] < unet6["psnr_db"]
    assert variants["palettize6"]["components"]["decoder"]["compression"] == {"method": "none"}
    sizes = [variants[v]["components"]["unet"]["size_bytes"] for v in VARIANTS]
    assert sizes[0] > sizes[1] > sizes[2]
    assert variants["fp16"]["size_bytes"] == sum(e["size_bytes"] for e in variants["fp16"]["components"].values())
    assert [variants[v]["average_bits_per_weight"] for v in VARIANTS] == [16.0, 6.0, 4.0]


def test_end_to_end_quality_per_variant(exported):
    _, out, manifest, messages = exported
    settings = manifest["end_to_end_settings"]
    assert len(settings["prompts"]) == len(settings["seeds"]) == 8 and settings["resolution"] == 64
    e2e = {v: manifest["variants"][v]["end_to_end"] for v in VARIANTS}
    assert e2e["fp16"]["image_psnr_db"] > e2e["palettize6"]["image_psnr_db"] > e2e["palettize4"]["image_psnr_db"]
    assert all(e["worst_image_psnr_db"] <= e["image_psnr_db"] for e in e2e.values())
    assert e2e["fp16"]["nearest_reference_agreement"] == 1.0
    assert any(m.startswith("palettize4: end-to-end image PSNR") for m in messages)
    text = ModelCard.load(out / "README.md").text
    assert "end-to-end image PSNR" in text and f"{e2e['palettize6']['image_psnr_db']} dB" in text


def test_scheduler_json_and_progress(exported):
    pipe, out, manifest, messages = exported
    schedule = json.loads((out / "scheduler" / "coreml_schedule.json").read_text())
    steps = pipe.sampling_defaults["num_inference_steps"]
    pipe.scheduler.set_timesteps(steps)
    assert schedule["num_inference_steps"] == steps
    assert schedule["timesteps"] == pytest.approx(pipe.scheduler.timesteps.tolist(), abs=1e-4)
    assert schedule["sigmas"][0] == 1.0 and schedule["sigmas"][-1] == 0.0
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    for name in ("text_encoder", "text_encoder_2", "unet", "decoder"):
        assert any(m.startswith(f"[{name}] converting") for m in messages)
        assert any(m.startswith(f"[{name}] saved packages/palettize4/") for m in messages)


def test_model_card_metadata(exported):
    _, out, manifest, _ = exported
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "coreml"
    assert card.data.pipeline_tag == "text-to-image"
    assert {"coreml", "snapgen"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0" and card.data.base_model == "someone/snapgen-tiny"
    text = card.text
    assert "`palettize6`" in text and "MLModel.compileModel" in text and '"noise_pred"' in text
    assert "sigmas[step + 1] - sigmas[step]" in text
    assert ", ".join(f"{t:g}" for t in manifest["scheduler"]["timesteps"]) in text


def test_push_to_hub_uploads_folder(exported, monkeypatch):
    _, out, _, _ = exported
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["create"] = (repo_id, kwargs)

        def upload_folder(self, **kwargs):
            calls["upload"] = kwargs
            return "commit-info"

    monkeypatch.setattr(cards_module, "HfApi", FakeApi)
    listed = push_folder_to_hub(out, "someone/snapgen-coreml", dry_run=True, progress=None)
    assert listed == upload_plan(out) and "coreml_manifest.json" in listed and "create" not in calls
    assert push_folder_to_hub(out, "someone/snapgen-coreml", progress=None) == "commit-info"
    assert calls["create"][0] == "someone/snapgen-coreml" and calls["create"][1]["exist_ok"] is True
    assert calls["upload"]["folder_path"] == str(out) and calls["upload"]["repo_id"] == "someone/snapgen-coreml"
    with pytest.raises(ValueError, match="`repo_id`"):
        push_folder_to_hub(out, "not a repo", dry_run=True)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "tiny-snapgen"
    _pipe().save_pretrained(folder)
    return folder


def test_cli_dry_run_writes_nothing(saved_pipeline, tmp_path, capsys):
    from diffusers_snapgen.cli import main

    out = tmp_path / "out"
    code = main(["convert-coreml", "--model", str(saved_pipeline), "--output", str(out), "--resolution", "64",
                 "--variants", "fp16,palettize8", "--push-to-hub", "someone/x", "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert "packages/palettize8/Unet.mlpackage" in printed and "would upload" in printed


def test_conversion_script_converts(saved_pipeline, tmp_path):
    script = REPO_ROOT / "conversion" / "convert_snapgen_to_coreml.py"
    out = tmp_path / "decoder-only"
    done = subprocess.run(
        [sys.executable, str(script), "--model", str(saved_pipeline), "--output", str(out), "--resolution", "64",
         "--target", "ios17", "--components", "decoder", "--variants", "fp16"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[decoder] converting to VAEDecoder.mlpackage (iOS17, fp16)" in done.stdout
    assert (out / "packages" / "fp16" / "VAEDecoder.mlpackage").is_dir()
    assert json.loads((out / MANIFEST_NAME).read_text())["deployment_target"] == "iOS17"


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    from diffusers_snapgen.coreml.cli import main

    not_a_model = tmp_path / "random-folder"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    bad_out = tmp_path / "bad"
    assert main(["--model", str(not_a_model), "--output", str(bad_out)]) == 2
    err = capsys.readouterr().err
    assert "unsupported model" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["--model", "x", "--output", str(bad_out), "--variants", "fp16,palettize5"]) == 2
    assert "palettize5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "x", "--output", str(bad_out), "--target", "iOS16"])
    assert "iOS16" in capsys.readouterr().err
    assert not bad_out.exists()


def test_failed_step_leaves_no_partial_output(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = export_module._save_variant

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(export_module, "_save_variant", flaky)
    out = tmp_path / "export"
    with pytest.raises(RuntimeError, match="disk full"):
        export_pipeline(_pipe(), out, resolution=64, components="decoder,text", variants="fp16", progress=None)
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no text encoder"):
        export_pipeline(_pipe(text_encoder="none"), out, resolution=64, components="text", progress=None)
    with pytest.raises(ValueError, match="`resolution`"):
        export_pipeline(_pipe(), out, resolution=40, progress=None)
    assert list(tmp_path.iterdir()) == []
