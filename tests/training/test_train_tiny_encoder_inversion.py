"""``train_tiny_encoder.py --targets pipeline_samples``: a TinyEncoder for a pipeline that has a decoder only, trained
to invert it on the pipeline's own samples (tiny random pipeline, CPU, offline), and how training scripts find that
encoder in a pipeline's ``vae_encoder/`` subfolder and the embedded model under the name ``default``."""

import json

import pytest
import torch
from helpers import read_metrics, run_once, run_script, session_folder, write_imagefolder

from diffusers_snapgen.testing import tiny_pipeline

STEPS = 60
ENCODER_CONFIG = {"block_out_channels": [8, 16, 16, 32], "layers_per_block": 1, "norm_num_groups": 8}


def _args(pipe, data, out, *extra):
    return ["--targets", "pipeline_samples", "--pretrained_model_name_or_path", str(pipe), "--train_data_dir",
            str(data), "--resolution", "32", "--num_pipeline_samples", "48", "--sample_batch_size", "16",
            "--num_eval_images", "8", "--train_batch_size", "8", "--learning_rate", "5e-3", "--max_train_steps",
            str(STEPS), "--validation_steps", "30", "--checkpointing_steps", "30", "--report_to", "none",
            "--logging_steps", "1", "--seed", "3", "--output_dir", str(out), "--encoder_config",
            json.dumps(ENCODER_CONFIG), *extra]


def _fixture_root(tmp_path_factory, worker_id, testrun_uid):
    root = session_folder(tmp_path_factory, worker_id, testrun_uid, "snapgen-inversion")

    def build():
        # the decoder to invert: a random tiny TinyDecoder is nearly constant in z, a random AutoencoderKL's is not
        tiny_pipeline("generic", vae="kl").save_pretrained(root / "pipe")
        tiny_pipeline("generic").save_pretrained(root / "pipe-tiny-decoder")  # a TinyDecoder: it cannot encode
        write_imagefolder(root / "data", n=12, size=32)
        args = _args(root / "pipe", root / "data", root / "ref", "--pixel_loss_weight", "0.5", "--pixel_batch_size",
                     "2", "--random_flip")
        run_script("train_tiny_encoder.py", args, root / "hf")

    run_once(root, "reference", build)
    return root


def test_sample_decoder_pairs_are_the_pipelines_latents_and_their_decodings():
    from diffusers_snapgen.training.tasks import sample_decoder_pairs

    pipe = tiny_pipeline("generic")
    z, x = sample_decoder_pairs(pipe, ["a red circle", "a blue square", "a red circle"], [1, 2, 1], 32, batch_size=2)
    assert z.shape == (3, 4, 4, 4) and x.shape == (3, 3, 32, 32)
    torch.testing.assert_close(z[0], z[2], rtol=1e-4, atol=1e-4)  # one seeded generator per image
    assert (z[0] - z[1]).abs().mean() > 0.1
    scaled = pipe(["a blue square"], height=32, width=32, generator=torch.Generator().manual_seed(2),
                  output_type="latent").images
    shift = pipe.vae.config.shift_factor
    torch.testing.assert_close(z[1:2], scaled / pipe.vae.config.scaling_factor + shift, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # unscaled latents and their decodings
        torch.testing.assert_close(x[1:2], pipe.vae.decode(z[1:2]).sample.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="`seeds`"):
        sample_decoder_pairs(pipe, ["a"], [1, 2], 32)
    with pytest.raises(TypeError, match="`prompts`"):
        sample_decoder_pairs(pipe, "a red circle", [1], 32)
    with pytest.raises(ValueError, match="sample_batch_size"):
        sample_decoder_pairs(pipe, ["a"], [1], 32, batch_size=0)


def test_inversion_run_learns_the_decoders_inverse(tmp_path_factory, worker_id, testrun_uid):
    from diffusers_snapgen import SnapGenPipeline, TinyEncoder

    root = _fixture_root(tmp_path_factory, worker_id, testrun_uid)
    ref = root / "ref"
    results = json.loads((ref / "eval_results.json").read_text())
    initial, final = results["initial"], results["final"]
    print(f"latent MSE {initial['latent_mse']:.4f} -> {final['latent_mse']:.4f}, round-trip PSNR "
          f"{initial['roundtrip_psnr']:.2f} -> {final['roundtrip_psnr']:.2f} dB")
    # a random decoder of a random UNet's latents is hard to invert: 60 steps take about 40% off the MSE, +2 dB
    assert final["latent_mse"] < 0.8 * initial["latent_mse"], results
    assert final["roundtrip_psnr"] > initial["roundtrip_psnr"] + 1.0, results
    assert {"psnr", "ssim"} <= final.keys()  # held-out real images through the decoder
    assert results["targets"] == "pipeline_samples" and results["num_pipeline_samples"] == 48
    assert results["num_eval_samples"] == 8
    assert [e["step"] for e in read_metrics(ref, "eval.jsonl")] == [0, 30, 60]
    metrics = read_metrics(ref)
    assert len(metrics) == STEPS and all({"latent_mse", "pixel_mse"} <= m.keys() for m in metrics)
    assert list((ref / "cache").glob("pipeline-samples-*.safetensors"))  # sampled once, reused on resume

    decoder = SnapGenPipeline.from_pretrained(str(root / "pipe"), text_encoder=None, tokenizer=None).vae
    encoder = TinyEncoder.from_pretrained(str(ref))
    assert (encoder.config.scaling_factor, encoder.config.shift_factor) == (decoder.config.scaling_factor,
                                                                            decoder.config.shift_factor)
    assert encoder.config.latent_channels == decoder.config.latent_channels


def test_a_pipelines_vae_encoder_encodes_its_training_images(tmp_path_factory, worker_id, testrun_uid, tmp_path):
    """A decoder-only pipeline with `vae_encoder/` is a training base: its TinyEncoder encodes the images."""
    import shutil

    from diffusers_snapgen import TinyEncoder
    from diffusers_snapgen.training import encode_latents, load_base_components, load_vae_encoder

    root = _fixture_root(tmp_path_factory, worker_id, testrun_uid)
    folder = tmp_path / "pipe"
    shutil.copytree(root / "pipe-tiny-decoder", folder)
    with pytest.raises(ValueError, match="vae_encoder"):  # no encoder yet: the error says how to get one
        load_vae_encoder(load_base_components(str(folder)))
    with pytest.raises(ValueError, match="holds a TinyDecoder, not an AutoencoderKL"):  # not loaded as a random AE
        load_vae_encoder({}, str(folder))
    TinyEncoder.from_pretrained(str(root / "ref")).save_pretrained(folder / "vae_encoder")
    components = load_base_components(str(folder))
    assert "vae_encoder" not in json.loads((folder / "model_index.json").read_text())  # not a pipeline component
    encoder = load_vae_encoder(components)
    assert isinstance(encoder, TinyEncoder) and not any(p.requires_grad for p in encoder.parameters())
    latents = encode_latents(encoder, torch.rand(2, 3, 32, 32) * 2 - 1)
    assert latents.shape == (2, 4, 4, 4)


def test_inversion_arguments_are_checked(tmp_path):
    from diffusers_snapgen.training.task_args import parse_encoder_args

    data = write_imagefolder(tmp_path / "data", n=2, size=16)
    base = ["--targets", "pipeline_samples", "--pretrained_model_name_or_path", "default",
            "--train_data_dir", str(data)]
    args = parse_encoder_args(base)
    assert args.targets == "pipeline_samples" and args.pixel_batch_size is None
    with pytest.raises(ValueError, match="--pretrained_vae_model_name_or_path"):
        parse_encoder_args(base + ["--pretrained_vae_model_name_or_path", str(tmp_path)])
    with pytest.raises(ValueError, match="--num_pipeline_samples"):
        parse_encoder_args(base + ["--num_pipeline_samples", "0"])
    assert parse_encoder_args(base[2:]).targets == "autoencoder"  # the default: autoencoder distillation


def test_default_names_the_embedded_model(monkeypatch, tmp_path):
    from diffusers_snapgen import default_model_path
    from diffusers_snapgen.training.components import resolve_model_path

    assert resolve_model_path("default") == str(default_model_path())
    assert resolve_model_path("runs/base") == "runs/base" and resolve_model_path(None) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    assert resolve_model_path("default") == "default"  # a folder of that name here wins
    monkeypatch.setenv("SNAPGEN_DEFAULT_MODEL", "")
    monkeypatch.chdir(tmp_path / "default")
    with pytest.raises(ValueError, match="ships no default model"):
        resolve_model_path("default", "--unet_model_name_or_path")
