"""Data, caches, atomic checkpoints and the command line (src/diffusers_snapgen/training/{data,checkpointing,args}.py)."""

import json
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
from helpers import write_imagefolder

from diffusers_snapgen.training import (
    EpochShuffleSampler,
    ImageCaptionDataset,
    LatentCache,
    TextEmbeddingCache,
    TrainingState,
    atomic_save_pipeline,
    build_train_dataloader,
    latest_checkpoint,
    list_checkpoints,
    load_image_caption_dataset,
    parse_args,
    preprocess_image,
    prune_checkpoints,
    remove_incomplete,
    resolve_resume_checkpoint,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("imgs"), n=6, size=40)


@pytest.fixture(scope="module")
def hf_dataset(imagefolder, tmp_path_factory):
    return load_image_caption_dataset(train_data_dir=str(imagefolder), cache_dir=str(tmp_path_factory.mktemp("hf")))


def test_imagefolder_with_metadata_captions(hf_dataset, imagefolder, tmp_path):
    assert len(hf_dataset) == 6 and hf_dataset[0]["text"] == "a red square"
    with pytest.raises(ValueError, match="--caption_column"):
        load_image_caption_dataset(train_data_dir=str(imagefolder), caption_column="prompt", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="train_data_dir"):
        load_image_caption_dataset()


def test_a_split_folder_named_test_loads_all_its_images(tmp_path):
    """`--validation_data_dir data/emoji/test` holds `bullet-train.png`: datasets reads file names as split patterns
    and would make that one file the train split."""
    root = tmp_path / "emoji"
    write_imagefolder(root / "train", n=3, size=40)
    test = write_imagefolder(root / "test", n=5, size=40)
    (test / "000.png").rename(test / "bullet-train.png")
    metadata = (test / "metadata.jsonl").read_text().replace('"000.png"', '"bullet-train.png"')
    (test / "metadata.jsonl").write_text(metadata)
    held = load_image_caption_dataset(train_data_dir=str(root / "test"), cache_dir=str(tmp_path / "hf"))
    assert len(held) == 5 and "text" in held.column_names
    whole = load_image_caption_dataset(train_data_dir=str(root), cache_dir=str(tmp_path / "hf"))
    assert len(whole) == 3  # a folder with split subfolders: its train split


def test_augmentation_is_a_function_of_seed_epoch_and_index(hf_dataset):
    ds = ImageCaptionDataset(hf_dataset, resolution=32, center_crop=False, random_flip=True, seed=3)
    a = [ds[i] for i in range(6)]
    b = [ds[i] for i in range(6)]
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) and x["flip"] == y["flip"] for x, y in zip(a, b))
    assert a[0]["pixel_values"].shape == (3, 32, 32) and a[0]["pixel_values"].min() >= -1 and a[0]["pixel_values"].max() <= 1
    ds.set_epoch(1)
    c = [ds[i] for i in range(6)]
    assert any(not torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, c))
    flipped = preprocess_image(hf_dataset[0]["image"], 32, center_crop=True, flip=True)
    assert torch.equal(flipped, preprocess_image(hf_dataset[0]["image"], 32, center_crop=True).flip(-1))
    with pytest.raises(TypeError, match="image"):
        preprocess_image(torch.zeros(3, 4, 4), 32)


def test_skipping_consumed_batches_resumes_the_exact_order(hf_dataset):
    from accelerate import Accelerator

    ds = ImageCaptionDataset(hf_dataset, resolution=32, random_flip=True, seed=1)
    acc = Accelerator(cpu=True)
    loader = acc.prepare(build_train_dataloader(ds, 2, seed=1)[0])
    loader.set_epoch(1)
    ds.set_epoch(1)
    full = [(b["index"].tolist(), b["flip"].tolist()) for b in loader]
    skipped = acc.skip_first_batches(loader, 1)
    skipped.set_epoch(1)
    assert [(b["index"].tolist(), b["flip"].tolist()) for b in skipped] == full[1:]
    loader.set_epoch(2)
    assert [b["index"].tolist() for b in loader] != [x[0] for x in full]  # a new epoch reshuffles
    s = EpochShuffleSampler(6, seed=1)
    s.set_epoch(1)
    assert sorted(s) == list(range(6))
    with pytest.raises(ValueError, match="batch_size"):
        build_train_dataloader(ds, 0)


def test_latent_and_text_caches(hf_dataset, tmp_path):
    from diffusers_snapgen.testing import tiny_autoencoder_kl

    vae = tiny_autoencoder_kl()
    ds = ImageCaptionDataset(hf_dataset, resolution=32, center_crop=True, random_flip=True, seed=0)
    path = tmp_path / "lat.safetensors"
    cache = LatentCache.build(ds, vae, batch_size=4, path=path)
    assert cache.mean.shape == (6, 2, 4, 4, 4)  # both flips cached
    with torch.no_grad():
        for flip in (0, 1):
            pixels = preprocess_image(hf_dataset[2]["image"], 32, center_crop=True, flip=bool(flip))
            assert torch.allclose(cache.mean[2, flip], vae.encode(pixels[None]).latent_dist.mean[0], atol=1e-5)
    again = LatentCache.build(ds, None, path=path)  # reused from disk, no VAE needed
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    idx, flips = torch.tensor([1, 2]), torch.tensor([False, True])
    assert torch.equal(cache.sample(idx, flips, g()), again.sample(idx, flips, g()))
    calls = []

    def encode(caps):
        calls.append(list(caps))
        return torch.ones(len(caps), 3, 5) * torch.tensor([len(c) for c in caps])[:, None, None], torch.zeros(len(caps), 2)

    text = TextEmbeddingCache.build(ds.first_captions(), encode, batch_size=4, path=tmp_path / "text.safetensors")
    assert calls[-1] == [""] and text.embeds.shape == (6, 3, 5)
    e, _ = text.get(torch.tensor([0, 1]), empty=torch.tensor([False, True]))
    assert e[0, 0, 0] == len("a red square") and e[1].abs().sum() == 0  # empty prompt for dropped captions


def _checkpoint_accelerator(tmp):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp)))
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = acc.prepare(model, opt)
    state = TrainingState(global_step=0, seed=5)
    acc.register_for_checkpointing(state)
    return acc, model, opt, state


def test_checkpoints_are_atomic_listed_pruned_and_resumable(tmp_path):
    acc, model, opt, state = _checkpoint_accelerator(tmp_path)
    for step in (2, 4, 6):
        state.global_step, state.epoch, state.batches_in_epoch = step, step // 4, step % 4
        save_checkpoint(acc, tmp_path, state, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert json.loads((tmp_path / "checkpoint-6" / "training_state.json").read_text())["global_step"] == 6
    # leftovers of a killed save, and a folder without the state file, are never picked
    (tmp_path / ".tmp-checkpoint-8").mkdir()
    (tmp_path / "checkpoint-9").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-6"
    assert [p.name for p in remove_incomplete(tmp_path)] == [".tmp-checkpoint-8"]
    with pytest.raises(ValueError, match="complete checkpoint"):
        resolve_resume_checkpoint(tmp_path, "checkpoint-9")
    assert resolve_resume_checkpoint(tmp_path, "latest").name == "checkpoint-6"
    assert resolve_resume_checkpoint(tmp_path / "empty", "latest") is None
    with torch.no_grad():
        model.weight.zero_()
    state.global_step = 0
    acc.load_state(str(tmp_path / "checkpoint-4"))
    assert state.global_step == 4 and state.batches_in_epoch == 0 and state.epoch == 1
    assert model.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="checkpoints_total_limit"):
        prune_checkpoints(tmp_path, 0)


def _save_forever(root):
    from accelerate import Accelerator

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    _model = acc.prepare(torch.nn.Linear(2048, 4096))  # 32 MB per save: slow enough to be killed mid-way
    state = TrainingState()
    acc.register_for_checkpointing(state)
    step = 0
    while True:
        step += 1
        state.global_step = step
        save_checkpoint(acc, root, state)


def test_a_save_killed_midway_never_becomes_latest(tmp_path):
    ctx = mp.get_context("fork")
    proc = ctx.Process(target=_save_forever, args=(str(tmp_path),))
    proc.start()
    try:
        deadline = time.time() + 60
        # wait until a complete checkpoint exists and the next save is under way
        while time.time() < deadline and not (latest_checkpoint(tmp_path) and any(
                p.name.startswith(".tmp-checkpoint") for p in tmp_path.iterdir())):
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    latest = latest_checkpoint(tmp_path)
    assert latest is not None
    state = json.loads((latest / "training_state.json").read_text())
    assert latest.name == f"checkpoint-{state['global_step']}"
    from safetensors.torch import load_file

    assert load_file(str(latest / "model.safetensors"))["weight"].shape == (4096, 2048)  # complete, readable
    remove_incomplete(tmp_path)
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_atomic_pipeline_save_keeps_other_content(tmp_path):
    from diffusers import DiffusionPipeline

    from diffusers_snapgen.testing import tiny_pipeline

    (tmp_path / "checkpoint-1").mkdir()
    pipe = tiny_pipeline(text_encoder="none")
    atomic_save_pipeline(pipe, tmp_path)
    atomic_save_pipeline(pipe, tmp_path)  # overwriting an existing pipeline works
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == "SnapGenPipeline"
    assert (tmp_path / "checkpoint-1").is_dir()
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_command_line_validation(imagefolder):
    base = ["--pretrained_model_name_or_path", "x", "--train_data_dir", str(imagefolder), "--report_to", "none"]
    args = parse_args(base + ["--validation_prompt", "a", "--validation_prompts", "b", "c"])
    assert args.validation_prompts == ["a", "b", "c"] and args.seed == 0 and args.resolution == 512
    kd = parse_args(base + ["--teacher_model_name_or_path", "t", "--teacher_subfolder", ""], kd=True)
    assert kd.teacher_subfolder is None and kd.kd_scaling == "timestep_aware"
    bad = [
        (["--resolution", "30"], "--resolution"),
        (["--proportion_empty_prompts", "1.5"], "--proportion_empty_prompts"),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit"),
        (["--unet_config", "{not json"], "--unet_config"),
        (["--report_to", "wandb", "--hub_token", "x"], "hub_token"),
    ]
    for extra, flag in bad:
        with pytest.raises(ValueError, match=flag):
            parse_args(base + extra)
    with pytest.raises(ValueError, match="--dataset_name"):
        parse_args(["--pretrained_model_name_or_path", "x", "--report_to", "none"])
    with pytest.raises(ValueError, match="--kd_alpha_min"):
        parse_args(base + ["--teacher_model_name_or_path", "t", "--kd_alpha_min", "0.9"], kd=True)
    with pytest.raises(ValueError, match="disable"):
        parse_args(base + ["--teacher_model_name_or_path", "t", "--disable_output_kd", "--disable_feature_kd"], kd=True)
