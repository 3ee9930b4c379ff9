"""Training past one process (docs/distributed_training.md), on CPU processes (gloo) launched with the shipped accelerate
configs: two processes train what one process trains with the same global batch (gradient accumulation in place of
the second process), a two-process checkpoint resumes in one process, the data position is a number of global
samples, streamed tar shards train, precomputed shards load as the device caches, and the FSDP2 pieces (sharded EMA,
gathered state dicts) compute what unsharded tensors compute.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    CONFIGS,
    ROOT,
    free_port,
    launch_script,
    load_weights,
    make_denoiser_assets,
    max_weight_diff,
    read_metrics,
    run_once,
    run_script,
    script_env,
    session_folder,
    write_tar_shards,
)

from diffusers_snapgen.training.checkpointing import TrainingState
from diffusers_snapgen.training.streaming import expand_shards

PRETRAIN, KD = "train_snapgen.py", "train_snapgen_kd.py"
TOLERANCE = 1e-5  # float tolerance; on CPU the runs came out bitwise equal


@pytest.fixture(scope="session")
def assets(tmp_path_factory, worker_id, testrun_uid):
    root = session_folder(tmp_path_factory, worker_id, testrun_uid, "snapgen-train")  # shared with test_train_snapgen
    run_once(root, "assets", lambda: make_denoiser_assets(root))
    return root


def _args(assets, out, steps, *extra):
    return ["--pretrained_model_name_or_path", str(assets / "base"), "--resolution", "32", "--center_crop",
            "--random_flip", "--train_batch_size", "2", "--learning_rate", "1e-2", "--lr_scheduler",
            "constant_with_warmup", "--lr_warmup_steps", "2", "--use_ema", "--max_train_steps", str(steps),
            "--checkpointing_steps", "2", "--report_to", "none", "--logging_steps", "1", "--seed", "7",
            "--output_dir", str(out), *extra]


def _assert_same_training(a: Path, b: Path, subfolders, steps):
    for sub in subfolders:
        assert max_weight_diff(a / sub, b / sub) <= TOLERANCE, sub
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    for step in steps:  # the logged means are reduced over both processes: the one-process run's
        ra, rb = next(r for r in rows_a if r["step"] == step), next(r for r in rows_b if r["step"] == step)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5) and ra["lr"] == pytest.approx(rb["lr"])


def _precompute_args(assets, out):
    return ["--pretrained_model_name_or_path", str(assets / "base"), "--train_data_dir", str(assets / "data"),
            "--resolution", "32", "--center_crop", "--random_flip", "--shard_size", "3", "--batch_size", "2",
            "--dataloader_num_workers", "2", "--output_dir", str(out)]


@pytest.fixture(scope="session")
def precomputed(assets):
    """precompute_latents.py's shards of the 8 images (in process, one process)."""
    from diffusers_snapgen.training.precompute import parse_precompute_args, run_precompute

    out = assets / "precomputed"
    run_once(assets, "precomputed", lambda: run_precompute(parse_precompute_args(_precompute_args(assets, out))))
    return out


def test_configs_describe_the_strategies():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp, fsdp, ds, nodes = (load_config_from_file(str(CONFIGS / f)) for f in (
        "ddp.yaml", "fsdp2.yaml", "deepspeed_zero2.yaml", "ddp_two_nodes.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.num_machines == 1
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "NO_WRAP"  # one policy for the UNet and the KD projectors
    assert ds.distributed_type == "DEEPSPEED" and ds.deepspeed_config["zero_stage"] == 2
    assert nodes.num_machines == 2 and nodes.num_processes == 16 and nodes.main_process_port == 29500


def test_position_is_global_samples_and_converts_between_layouts():
    state = TrainingState(global_step=5, epoch=1, batches_in_epoch=3, micro_batch_size=2, num_processes=4)
    saved = state.state_dict()
    assert saved["samples_in_epoch"] == 24
    resumed = TrainingState()
    resumed.load_state_dict(json.loads(json.dumps(saved)))
    assert resumed.relayout(2, 1) == (4, 0) and resumed.batches_in_epoch == 12  # 4 processes -> 1
    resumed.load_state_dict(saved)
    assert resumed.relayout(4, 5) == (4, 4) and resumed.batches_in_epoch == 1  # 24 = 1 x 20 + 4 seen again
    old = TrainingState()  # a checkpoint written before the layout was recorded: 2 RNG files, same micro-batch
    old.load_state_dict({"global_step": 3, "epoch": 0, "batches_in_epoch": 3, "seed": 7})
    assert old.relayout(2, 1, saved_num_processes=2) == (2, 0) and old.batches_in_epoch == 6


def test_stream_blocks_go_round_robin_and_resume_at_any_world_size(assets, tmp_path):
    from diffusers_snapgen.training.batches import StreamBatches
    from diffusers_snapgen.training.streaming import StreamExamples, load_stream

    assert expand_shards("d/{00008..00010}.tar::e/{a,b}-{1..2}.tar") == [
        "d/00008.tar", "d/00009.tar", "d/00010.tar", "e/a-1.tar", "e/a-2.tar", "e/b-1.tar", "e/b-2.tar"]
    pattern = write_tar_shards(assets / "data", tmp_path / "shards")
    stream, image, caption = load_stream(train_shards=pattern, cache_dir=str(tmp_path / "hf"))
    assert (image, caption) == ("png", "txt")
    examples = StreamExamples(image, caption, 32, center_crop=True, random_flip=True, seed=7)

    def take(p, w, n, start=0, workers=0):
        it = StreamBatches(stream, examples, 2, "cpu", p, w, workers).epoch(0, start)
        return [next(it) for _ in range(n)]

    single = take(0, 1, 6, workers=2)  # the 8 samples and then the stream again: global indices 0..11
    assert torch.cat([b["index"] for b in single]).tolist() == list(range(12))
    assert single[4]["caption"] == single[0]["caption"]  # the stream repeats the 8 samples
    ranks = [take(p, 2, 3) for p in range(2)]
    for m in range(3):  # global micro-batch m: rank 0 then rank 1, the single process's micro-batches 2m, 2m + 1
        for p in range(2):
            assert torch.equal(ranks[p][m]["index"], single[2 * m + p]["index"])
            assert torch.equal(ranks[p][m]["pixel_values"], single[2 * m + p]["pixel_values"])  # same crops, flips
            assert ranks[p][m]["caption"] == single[2 * m + p]["caption"]
    resumed = take(1, 2, 1, start=1)  # after global micro-batch 0 (4 samples) on 2 processes
    assert resumed[0]["index"].tolist() == [6, 7]


def test_precomputed_shards_are_the_training_caches(assets, precomputed):
    from diffusers_snapgen.training import ImageCaptionDataset, load_base_components, load_image_caption_dataset
    from diffusers_snapgen.training.data import LatentCache, TextEmbeddingCache
    from diffusers_snapgen.training.precompute import _blocks, load_precomputed, parse_precompute_args, read_index

    index = read_index(precomputed)
    assert index["num_samples"] == 8 and [s["count"] for s in index["shards"]] == [3, 3, 2]
    args = parse_precompute_args(_precompute_args(assets, precomputed))
    assert [k for k, *_ in _blocks(args, 1, 2)] == [1]  # process p of N writes shards p, p + N, ...
    assert [k for k, *_ in _blocks(args, 0, 2)] == [0, 2]
    latents, text, _ = load_precomputed(precomputed)
    comps = load_base_components(str(assets / "base"))
    ds = ImageCaptionDataset(load_image_caption_dataset(train_data_dir=str(assets / "data"),
                                                        cache_dir=str(assets / "hf-pre")), resolution=32,
                             center_crop=True, random_flip=True)
    reference = LatentCache.build(ds, comps["vae"], batch_size=8)
    assert torch.allclose(latents.mean, reference.mean, atol=1e-5) and torch.allclose(latents.std, reference.std)
    from diffusers_snapgen.training import build_pipeline, encode_captions

    pipe = build_pipeline(comps, None)
    ref_text = TextEmbeddingCache.build(ds.all_captions(), lambda c: encode_captions(pipe, c, "cpu"))
    assert torch.allclose(text.embeds, ref_text.embeds, atol=1e-5) and torch.equal(text.sample_count,
                                                                                     ref_text.sample_count)
    assert load_precomputed(precomputed, max_samples=5)[0].mean.shape[0] == 5
    with pytest.raises(ValueError, match="--resolution 32"):
        from diffusers_snapgen.training.precompute import check_settings

        check_settings(index, {"resolution": 64})


def test_kd_on_two_processes_resumes_in_one(assets, precomputed, tmp_path):
    """KD from the precomputed shards with the teacher sharded across 2 processes (FSDP2), checkpoint at step 2,
    resumed in 1 process (replicated teacher, 2 accumulated micro-batches): steps 3-4 train what the 2-process run
    trained, to float tolerance."""
    kd = ["--teacher_model_name_or_path", str(assets / "teacher"), "--precompute_dir", str(precomputed)]
    two, one = tmp_path / "two", tmp_path / "one"
    launch_script(KD, _args(assets, two, 4, *kd, "--teacher_sharding", "shard"), assets / "hf")
    (one / "checkpoint-2").parent.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(two / "checkpoint-2"), str(one / "checkpoint-2")], check=True)
    proc = run_script(KD, _args(assets, one, 4, *kd, "--gradient_accumulation_steps", "2", "--resume_from_checkpoint",
                                "latest"), assets / "hf")
    assert "written by 2 process(es) x micro-batch 2; this run has 1 x 2" in proc.stderr
    state = json.loads((two / "checkpoint-2" / "training_state.json").read_text())
    assert (state["epoch"], state["samples_in_epoch"], state["num_processes"]) == (0, 8, 2)  # 2 steps x 2 x 2
    _assert_same_training(two, one, ("checkpoint-4/unet", "checkpoint-4/unet_ema", "checkpoint-4/model.safetensors",
                                     "unet"), steps=(3, 4))
    assert len(load_weights(two / "checkpoint-4" / "model.safetensors")) == 8  # the projectors, saved once


def test_streamed_shards_train_the_same_on_two_processes_and_one(assets, tmp_path):
    pattern = write_tar_shards(assets / "data", tmp_path / "shards")
    stream = ["--train_shards", pattern, "--dataloader_num_workers", "1"]
    launch_script(PRETRAIN, _args(assets, tmp_path / "two", 4, *stream), assets / "hf")
    run_script(PRETRAIN, _args(assets, tmp_path / "one", 4, *stream, "--gradient_accumulation_steps", "2"),
               assets / "hf")
    _assert_same_training(tmp_path / "two", tmp_path / "one", ("checkpoint-2/unet", "checkpoint-4/unet",
                                                               "checkpoint-4/unet_ema", "unet"), steps=(1, 2, 3, 4))
    from diffusers import DiffusionPipeline

    assert type(DiffusionPipeline.from_pretrained(str(tmp_path / "two"))).__name__ == "SnapGenPipeline"


def test_fsdp2_pieces_compute_what_unsharded_tensors_compute(tmp_path):
    env = {**script_env(tmp_path / "hf"), "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(Path(__file__).parent / "_fsdp2_check.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert sorted(p.name for p in tmp_path.glob("ok-*")) == ["ok-0", "ok-1"]
