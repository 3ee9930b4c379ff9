"""Model cards rendered from hub_cards/ templates: YAML metadata and content (no conversion, no network)."""

import pytest
from huggingface_hub import ModelCard

from diffusers_snapgen.cards import hub_cards_dir, render_coreml_card, render_pytorch_card


def _manifest():
    io = {"inputs": [{"name": "sample", "shape": [1, 16, 128, 128], "dtype": "float16"},
                     {"name": "timestep", "shape": [1], "dtype": "float16"},
                     {"name": "encoder_hidden_states", "shape": [1, 333, 4096], "dtype": "float16"},
                     {"name": "pooled_projections", "shape": [1, 2048], "dtype": "float16"}],
          "outputs": [{"name": "noise_pred", "shape": [1, 16, 128, 128], "dtype": "float16"}]}
    entry = {"psnr_db": 41.2, "meets_threshold": True, "size_bytes": 2**20}
    return {
        "deployment_target": "iOS18", "resolution": 1024, "latent_size": 128, "batch_size": 1, "guidance_scale": 1.0,
        "scheduler": {"num_inference_steps": 4, "timesteps": [1000.0, 857.69, 602.15, 8.93],
                      "sigmas": [1.0, 0.857692, 0.602151, 0.008929, 0.0]},
        "components": {"unet": {"package": "Unet", "io": io},
                       "decoder": {"package": "VAEDecoder", "io": {"inputs": [], "outputs": []},
                                   "notes": {"scaling_factor": 1.5305, "shift_factor": 0.0609}}},
        "variants": {"fp16": {"size_bytes": 3 * 2**20, "components": {"unet": entry, "decoder": entry}},
                     "palettize4": {"size_bytes": 2**20, "components": {
                         "unet": {**entry, "psnr_db": 30.1, "meets_threshold": False}, "decoder": entry}}},
        "versions": {"coremltools": "9.0"},
    }


def test_templates_exist():
    folder = hub_cards_dir()
    assert (folder / "coreml_model_card.md").is_file() and (folder / "pytorch_model_card.md").is_file()


def test_coreml_card_metadata_and_swift_loop(tmp_path):
    card = render_coreml_card(_manifest(), model_id="snap/snapgen-1024", license="apache-2.0")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "coreml" and loaded.data.pipeline_tag == "text-to-image"
    assert {"coreml", "snapgen", "iOS18"} <= set(loaded.data.tags)
    assert loaded.data.base_model == "snap/snapgen-1024" and loaded.data.license == "apache-2.0"
    text = loaded.text
    assert "let timesteps: [Float] = [1000, 857.69, 602.15, 8.93]" in text
    assert "[1, 16, 128, 128]" in text and "/ 1.5305 + 0.0609" in text
    assert "| `palettize4` | 1.0 MiB | — | 30.1 dB ⚠ |" in text  # no bits/weight in this manifest
    assert "4 flow-matching steps without classifier-free guidance" in text
    # a local path is not a Hub base model
    assert render_coreml_card(_manifest(), model_id=str(tmp_path)).data.base_model is None


def test_coreml_card_classifier_top1_column():
    manifest = _manifest()
    manifest["end_to_end_settings"] = {"prompts": ["a"] * 4, "seeds": [0, 1, 2, 3], "resolution": 1024,
                                       "num_inference_steps": 4, "guidance_scale": 1.0,
                                       "classifier": {"classes": 10, "reference_top1": 0.125,
                                                      "reference_top1_by_group": {}}}
    manifest["variants"]["fp16"]["end_to_end"] = {"image_psnr_db": 70.0, "nearest_reference_agreement": 1.0,
                                                  "classifier_top1": 0.125, "classifier_top1_vs_fp16_points": 0.0}
    manifest["variants"]["palettize4"]["end_to_end"] = {"image_psnr_db": 20.0, "nearest_reference_agreement": 0.75,
                                                        "classifier_top1": 0.1, "classifier_top1_vs_fp16_points": -2.5}
    text = render_coreml_card(manifest).text
    assert "| nearest-reference agreement | classifier top-1 |" in text and "fp32 reference:\n12.5%" in text
    assert "| 20.0 dB | 75% | 10.0% (-2.5) |" in text and "| 70.0 dB | 100% | 12.5% (+0.0) |" in text
    del manifest["end_to_end_settings"]["classifier"]  # no classifier: no column
    assert "classifier top-1" not in render_coreml_card(manifest).text


def test_coreml_card_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`manifest`"):
        render_coreml_card({"components": {}})
    with pytest.raises(ValueError, match="`license`"):
        render_coreml_card(_manifest(), license="")


@pytest.mark.parametrize("kind,stage,tag", [("pipeline", "asd", "text-to-image"), ("unet", "kd", "text-to-image"),
                                            ("tiny_decoder", "tiny_decoder", None),
                                            ("autoencoder", "autoencoder", None),
                                            ("transformer", "teacher", None),
                                            ("lora", "lora", "text-to-image")])
def test_pytorch_cards(kind, stage, tag, tmp_path):
    card = render_pytorch_card(kind, stage, "me/snapgen-test", base_model="stabilityai/stable-diffusion-3.5-large",
                               training={"max_train_steps": 1000, "learning_rate": 1e-4}, datasets=["me/captions"],
                               num_inference_steps=4, guidance_scale=1.0)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "diffusers" and loaded.data.pipeline_tag == tag
    assert "snapgen" in loaded.data.tags and loaded.data.license == "apache-2.0"
    assert loaded.data.base_model == "stabilityai/stable-diffusion-3.5-large"
    assert loaded.data.datasets == ["me/captions"]
    assert "| max_train_steps | 1000 |" in loaded.text
    assert "me/snapgen-test" in loaded.text and "arxiv.org/abs/2412.09619" in loaded.text
    if kind == "pipeline":
        assert "num_inference_steps=4, guidance_scale=1.0" in loaded.text
    if kind == "tiny_decoder":
        assert "decoder.decode(z).sample" in loaded.text
    if kind == "autoencoder":
        assert "AutoencoderKL.from_pretrained(\"me/snapgen-test\")" in loaded.text
        assert "autoencoder-kl" in loaded.data.tags
        assert "train_autoencoder.py" in loaded.text and "snapgen generate" not in loaded.text
    if kind == "transformer":
        assert 'SD3Transformer2DModel.from_pretrained("me/snapgen-test", subfolder="transformer")' in loaded.text
        assert 'SnapGenPipeline.from_pretrained("stabilityai/stable-diffusion-3.5-large")' in loaded.text
        assert "--teacher_model_name_or_path me/snapgen-test --teacher_subfolder transformer" in loaded.text
        assert "train_sd3_teacher.py" in loaded.text and "mmdit" in loaded.data.tags
        assert "snapgen generate" not in loaded.text and "convert_snapgen_to_coreml" not in loaded.text

    if kind == "lora":
        assert 'pipe.load_lora_weights("me/snapgen-test")' in loaded.text and "lora" in loaded.data.tags
        assert "--lora me/snapgen-test" in loaded.text and "convert_snapgen_to_coreml" not in loaded.text


def test_pytorch_card_argument_errors():
    with pytest.raises(ValueError, match="`kind`"):
        render_pytorch_card("vae", "kd", "me/x")
    with pytest.raises(ValueError, match="`stage`"):
        render_pytorch_card("unet", "finetune", "me/x")
    with pytest.raises(ValueError, match="`repo_id`"):
        render_pytorch_card("unet", "kd", "")
    with pytest.raises(TypeError, match="`training`"):
        render_pytorch_card("unet", "kd", "me/x", training=[("lr", 1)])
    with pytest.raises(ValueError, match="`prompt`"):
        render_pytorch_card("lora", "lora", "me/x", prompt=" ")


def test_templates_ship_as_package_data():
    """Wheel installs find the templates: they live inside the package and setup.cfg lists them."""
    from pathlib import Path

    import diffusers_snapgen

    assert hub_cards_dir() == Path(diffusers_snapgen.__file__).resolve().parent / "hub_cards"
    import configparser

    setup_cfg = configparser.ConfigParser()
    setup_cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert "hub_cards/*.md" in setup_cfg["options.package_data"]["diffusers_snapgen"].split()


def _fake_upload(calls):
    def upload_folder(**kwargs):
        calls.append(kwargs)

    return upload_folder


@pytest.mark.parametrize("stage", ["pretrain", "kd", "asd"])
def test_training_push_writes_the_pipeline_card(stage, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub

    from diffusers_snapgen.training.tasks import ASDTask, FlowMatchingTask, KDTask

    calls = []
    monkeypatch.setattr(huggingface_hub, "upload_folder", _fake_upload(calls))
    args = SimpleNamespace(output_dir=str(tmp_path), hub_repo_id="me/snapgen-test", hub_token=None,
                           pretrained_model_name_or_path="stabilityai/stable-diffusion-3.5-large",
                           teacher_model_name_or_path="stabilityai/stable-diffusion-3.5-large",
                           dataset_name="me/images", train_data_dir=None, resolution=256, learning_rate=1e-4,
                           train_batch_size=4, mixed_precision="bf16", use_ema=True)
    task = object.__new__({"pretrain": FlowMatchingTask, "kd": KDTask, "asd": ASDTask}[stage])  # only what a push reads
    task.args, task.save_subfolder, task.card_kind = args, None, "pipeline"
    task.run = SimpleNamespace(state=SimpleNamespace(global_step=123))
    task.pipeline = SimpleNamespace(sampling_defaults={"num_inference_steps": 4, "guidance_scale": 1.0})
    task._push(images=[None, None])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.base_model == "stabilityai/stable-diffusion-3.5-large" and card.data.datasets == ["me/images"]
    script = {"pretrain": "train_snapgen.py", "kd": "train_snapgen_kd.py", "asd": "train_snapgen_asd.py"}[stage]
    assert script in card.text and "| steps | 123 |" in card.text
    assert "num_inference_steps=4" in card.text and "guidance_scale=1.0" in card.text
    assert ("| teacher |" in card.text) == (stage != "pretrain")
    assert calls and calls[0]["repo_id"] == "me/snapgen-test" and "checkpoint-*" in calls[0]["ignore_patterns"]


def test_decoder_push_writes_the_decoder_card(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub

    from diffusers_snapgen.training.tasks import TinyDecoderTask

    calls = []
    monkeypatch.setattr(huggingface_hub, "upload_folder", _fake_upload(calls))
    args = SimpleNamespace(output_dir=str(tmp_path), hub_repo_id="me/tiny-decoder", hub_token=None,
                           pretrained_vae_model_name_or_path=None, pretrained_model_name_or_path=str(tmp_path),
                           dataset_name=None, train_data_dir="./photos", resolution=256, learning_rate=1e-4,
                           train_batch_size=64)
    results = {"step": 50, "final": {"psnr": 18.1234, "ssim": 0.51234}, "initial": {"psnr": 14.5, "ssim": 0.2}}
    task = object.__new__(TinyDecoderTask)
    task.args = args
    task._push(results)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers" and card.data.base_model is None  # a local folder is no base model
    assert "TinyDecoder.from_pretrained(\"me/tiny-decoder\")" in card.text
    assert "14.50 -> 18.12" in card.text and "0.2000 -> 0.5123" in card.text
    assert len(calls) == 1 and calls[0]["folder_path"] == str(tmp_path)


def test_autoencoder_push_writes_the_autoencoder_card(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub

    from diffusers_snapgen.training.tasks import AutoencoderTask

    calls = []
    monkeypatch.setattr(huggingface_hub, "upload_folder", _fake_upload(calls))
    args = SimpleNamespace(output_dir=str(tmp_path), hub_repo_id="me/emoji-vae", hub_token=None,
                           vae_model_name_or_path=None, dataset_name=None, train_data_dir="data/emoji", resolution=256,
                           learning_rate=1e-4, train_batch_size=32, reconstruction_loss="l1", kl_weight=1e-6)
    results = {"step": 20000, "final": {"psnr": 31.234, "ssim": 0.91234}, "initial": {"psnr": 9.5, "ssim": 0.05},
               "scaling_factor": 0.812345678, "shift_factor": -0.0123456}
    task = object.__new__(AutoencoderTask)
    task.args = args
    task._push(results)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers" and card.data.base_model is None and "vae" in card.data.tags
    assert "AutoencoderKL.from_pretrained(\"me/emoji-vae\")" in card.text
    assert "9.50 -> 31.23" in card.text and "| scaling_factor | 0.81235 |" in card.text
    assert "| shift_factor | -0.01235 |" in card.text and "Trained from scratch on `data/emoji`" in card.text
    assert len(calls) == 1 and calls[0]["repo_id"] == "me/emoji-vae" and "checkpoint-*" in calls[0]["ignore_patterns"]


def test_teacher_push_writes_the_transformer_card(tmp_path, monkeypatch):
    """train_sd3_teacher.py pushes <output_dir>/transformer with a `transformer` card of stage `teacher`."""
    from types import SimpleNamespace

    import huggingface_hub

    from diffusers_snapgen.training.tasks import FlowMatchingTask

    calls = []
    monkeypatch.setattr(huggingface_hub, "upload_folder", _fake_upload(calls))
    args = SimpleNamespace(output_dir=str(tmp_path), hub_repo_id="me/emoji-teacher", hub_token=None,
                           pretrained_model_name_or_path=str(tmp_path), dataset_name=None, train_data_dir="data/emoji",
                           resolution=256, learning_rate=2e-4, train_batch_size=64, mixed_precision="bf16",
                           use_ema=True)
    task = object.__new__(FlowMatchingTask)
    task.args, task.name, task.save_subfolder, task.card_kind = args, "teacher", "transformer", "transformer"
    task.run = SimpleNamespace(state=SimpleNamespace(global_step=30000))
    task.pipeline = SimpleNamespace(sampling_defaults={"num_inference_steps": 28, "guidance_scale": 3.0})
    task._push(images=[])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag is None and card.data.base_model is None
    assert 'SD3Transformer2DModel.from_pretrained("me/emoji-teacher", subfolder="transformer")' in card.text
    assert "SD3TransformerDenoiser.wrap(transformer)" in card.text and "path/to/base-pipeline" in card.text
    assert "num_inference_steps=28, guidance_scale=3.0" in card.text and "| steps | 30000 |" in card.text
    assert "train_sd3_teacher.py" in card.text and "| teacher |" not in card.text
    assert len(calls) == 1 and calls[0]["repo_id"] == "me/emoji-teacher"
    assert "checkpoint-*" in calls[0]["ignore_patterns"]
