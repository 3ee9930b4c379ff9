"""The training engine (diffusers_snapgen.training.engine / step / batches / metrics) on a tiny regression task, in
process: the loop's accumulation and epochs, logging windows, exact resume, the device-side pieces (metrics, EMA,
random numbers, on-device batches and caches) and the command-line conventions."""

import argparse

import pytest
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from helpers import read_metrics, run_script

from diffusers_snapgen.training import (
    StepOutput,
    TrainingTask,
    finish,
    parse_or_exit,
    prepare_run,
    setup_accelerator,
    train,
)
from diffusers_snapgen.training.args import add_optimization_args, add_output_args, add_speed_args, validate_common
from diffusers_snapgen.training.batches import DeviceImageCache, DeviceIndexBatches, epoch_permutation
from diffusers_snapgen.training.data import ImageCaptionDataset, LatentCache, TextEmbeddingCache
from diffusers_snapgen.training.metrics import StepMetrics
from diffusers_snapgen.training.step import StepProgram, StepRandom, ema_update_, step_seed


class Regressor(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, width: int = 8):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.SiLU(), torch.nn.Linear(16, width))

    def forward(self, x):
        return self.net(x)


class ConvRegressor(ModelMixin, ConfigMixin):
    """The regressor's job through two 3x3 convolutions (4-D weights: what ``--channels_last`` lays out)."""

    @register_to_config
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.SiLU(),
                                        torch.nn.Conv2d(4, 2, 3, padding=1))

    def forward(self, x):
        return self.conv(x.reshape(-1, 2, 2, x.shape[1] // 4)).reshape(x.shape)


class RegressionTask(TrainingTask):
    """Learns a fixed linear map of per-sample inputs; every random draw comes from the step's generator."""

    name = "regression"

    def __init__(self, data: torch.Tensor):
        self.data, self.target_map = data, torch.linspace(-1, 1, data.shape[1] ** 2).reshape(data.shape[1], -1)
        self.seen = []

    def compute_loss(self, batch, generator):
        x = self.data[batch["index"]] + 0.1 * torch.randn(self.data[batch["index"]].shape, generator=generator)
        self.seen.append(batch["index"].tolist())
        err = (self.run.model(x) - x @ self.target_map).pow(2).mean(dim=1)
        t = torch.rand(x.shape[0], generator=generator)
        return StepOutput(err.mean(), {"x_mean": x.mean()}, {"err": err}, t)

    def save_final(self, model):
        model.save_pretrained(self.run.args.output_dir + "/final")


def _args(out, *extra):
    out.mkdir(parents=True, exist_ok=True)
    p = argparse.ArgumentParser()
    add_optimization_args(p)
    add_speed_args(p)
    add_output_args(p)
    for flag in ("--train_data_dir", "--dataset_name", "--resolution", "--dataloader_num_workers",
                 "--max_train_samples"):
        p.add_argument(flag, default={"--resolution": 8, "--dataloader_num_workers": 0}.get(flag),
                       type=int if flag in ("--resolution", "--dataloader_num_workers", "--max_train_samples") else str)
    args = p.parse_args(["--train_data_dir", str(out), "--output_dir", str(out), "--report_to", "none",
                         "--train_batch_size", "2", "--learning_rate", "1e-2", "--lr_warmup_steps", "0",
                         "--use_ema", "--seed", "5", *extra])
    return validate_common(args)


def _train(out, *extra, samples: int = 8, model_class=Regressor):
    args = _args(out, *extra)
    acc = setup_accelerator(args)
    torch.manual_seed(0)
    model = model_class()
    task = RegressionTask(torch.randn(samples, 8, generator=torch.Generator().manual_seed(1)))
    batches = DeviceIndexBatches(samples, args.train_batch_size, args.seed, acc.device)
    run = prepare_run(args, acc, task, model, [{"params": list(model.parameters())}], batches,
                      checkpoint_subfolder="model")
    train(run)
    finish(run)
    return run, task


def test_the_loop_groups_micro_batches_counts_epochs_and_logs_windows(tmp_path):
    run, task = _train(tmp_path / "a", "--max_train_steps", "5", "--gradient_accumulation_steps", "3",
                       "--logging_steps", "2", "--checkpointing_steps", "4")
    # 8 samples, batch 2: 4 micro-batches an epoch -> one step of 3 a epoch, the 4th micro-batch is dropped
    assert run.state.global_step == 5 and run.state.epoch == 4 and run.state.batches_in_epoch == 3
    assert len(task.seen) == 15
    first_epoch = torch.tensor(task.seen[:3]).flatten().tolist()
    assert first_epoch == epoch_permutation(8, 5, 0)[:6].tolist()
    rows = read_metrics(tmp_path / "a")
    assert [r["step"] for r in rows] == [2, 4, 5]  # every --logging_steps, and the last step
    assert {"loss", "x_mean", "grad_norm", "lr", "step_time", "steps_per_s", "samples_per_s"} <= rows[0].keys()
    assert any(k.startswith("buckets/err/t") for k in rows[0])
    assert (tmp_path / "a" / "checkpoint-4" / "model_ema").is_dir()
    assert (tmp_path / "a" / "final" / "config.json").is_file()


def test_resume_mid_run_is_bitwise_the_uninterrupted_run(tmp_path):
    common = ("--gradient_accumulation_steps", "2", "--logging_steps", "1", "--checkpointing_steps", "3",
              "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2")
    full, _ = _train(tmp_path / "full", "--max_train_steps", "7", *common)
    _train(tmp_path / "part", "--max_train_steps", "3", *common)
    resumed, _ = _train(tmp_path / "part", "--max_train_steps", "7", "--resume_from_checkpoint", "latest", *common)
    for a, b in zip(full.unwrapped_model.parameters(), resumed.unwrapped_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.equal(a, b)
    assert [r["loss"] for r in read_metrics(tmp_path / "full")[3:]] == \
        [r["loss"] for r in read_metrics(tmp_path / "part")[3:]]


def test_channels_last_lays_out_the_weights_and_trains_the_same_model(tmp_path):
    common = ("--max_train_steps", "4", "--logging_steps", "1", "--checkpointing_steps", "2")
    plain, _ = _train(tmp_path / "plain", *common, model_class=ConvRegressor)
    nhwc, _ = _train(tmp_path / "nhwc", *common, "--channels_last", model_class=ConvRegressor)
    weights = [p for p in nhwc.unwrapped_model.parameters() if p.dim() == 4]
    assert len(weights) == 2 and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                                      for p in weights)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in nhwc.ema.shadow_params if p.dim() == 4)
    assert not any(p.is_contiguous(memory_format=torch.channels_last) for p in plain.unwrapped_model.parameters()
                   if p.dim() == 4)
    assert [r["loss"] for r in read_metrics(tmp_path / "nhwc")] == \
        pytest.approx([r["loss"] for r in read_metrics(tmp_path / "plain")], rel=1e-5)
    saved = ConvRegressor.from_pretrained(str(tmp_path / "nhwc" / "final"))  # a plain diffusers folder
    for a, b in zip(saved.parameters(), plain.unwrapped_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    longer = ("--max_train_steps", "6", "--logging_steps", "1", "--checkpointing_steps", "2", "--channels_last")
    full, _ = _train(tmp_path / "full", *longer, model_class=ConvRegressor)
    resumed, _ = _train(tmp_path / "nhwc", *longer, "--resume_from_checkpoint", "latest", model_class=ConvRegressor)
    assert resumed.state.global_step == 6
    for a, b in zip(full.unwrapped_model.parameters(), resumed.unwrapped_model.parameters()):
        assert torch.equal(a, b) and a.stride() == b.stride()


def test_cudnn_benchmark_flag_sets_torchs_switch_and_trains_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    common = ("--max_train_steps", "2", "--logging_steps", "1")
    _train(tmp_path / "plain", *common, model_class=ConvRegressor)
    assert torch.backends.cudnn.benchmark is False
    _train(tmp_path / "tuned", *common, "--cudnn_benchmark", model_class=ConvRegressor)
    assert torch.backends.cudnn.benchmark is True
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name)] for name in ("plain", "tuned")}
    assert losses["tuned"] == losses["plain"]


def test_cuda_graphs_fall_back_to_eager_with_one_reason(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="diffusers_snapgen.training"):
        run, _ = _train(tmp_path / "g", "--max_train_steps", "2", "--cuda_graphs")
    assert run.program.mode == "eager"
    reasons = [r.message for r in caplog.records if "--cuda_graphs is off" in r.message]
    assert len(reasons) == 1 and "not a CUDA GPU" in reasons[0]


def test_start_after_waits_for_the_file_and_trains_as_without_it(tmp_path, monkeypatch, caplog):
    """--start_after: set up, wait until the file exists, then the same run as without the flag."""
    import threading

    marker = tmp_path / "teacher.done"
    file_at_first_step = []
    compute_loss = RegressionTask.compute_loss

    def recording(self, batch, generator):
        if not file_at_first_step:
            file_at_first_step.append(marker.exists())
        return compute_loss(self, batch, generator)

    monkeypatch.setattr(RegressionTask, "compute_loss", recording)
    timer = threading.Timer(1.0, marker.touch)
    timer.start()
    with caplog.at_level("INFO", logger="diffusers_snapgen.training"):
        waited, _ = _train(tmp_path / "w", "--max_train_steps", "3", "--start_after", str(marker))
    timer.join()
    assert file_at_first_step == [True]
    assert any("waiting for" in r.message for r in caplog.records)
    plain, _ = _train(tmp_path / "p", "--max_train_steps", "3")
    for a, b in zip(waited.unwrapped_model.parameters(), plain.unwrapped_model.parameters()):
        assert torch.equal(a, b)


def test_step_metrics_average_per_metric_and_per_bucket():
    m = StepMetrics("cpu", num_buckets=4)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    m.add(StepOutput(torch.tensor(2.0), {"a": torch.tensor(1.0)}, {"l": torch.tensor([1.0, 2.0, 3.0, 4.0])}, t))
    m.add(StepOutput(torch.tensor(4.0), {"b": 5.0}, {"l": torch.tensor([3.0, 2.0, 1.0, 0.0])}, t))
    m.add_step({"grad_norm": torch.tensor(0.5)})
    out = m.read()
    assert out["loss"] == 3.0 and out["a"] == 1.0 and out["b"] == 5.0 and out["grad_norm"] == 0.5
    assert out["buckets/l/t0.00-0.25"] == 2.0 and out["buckets/l/t0.75-1.00"] == 2.0
    assert m.read() == {"loss": 0.0, "a": 0.0, "b": 0.0, "grad_norm": 0.0}  # reset, nothing in the window
    with pytest.raises(ValueError, match="num_buckets"):
        StepMetrics("cpu", 0)


def test_ema_update_is_diffusers_ema_arithmetic():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = Regressor()
    frozen = model.net[0].bias
    frozen.requires_grad_(False)
    reference = EMAModel(model.parameters(), decay=0.9, foreach=False)
    ours = EMAModel(model.parameters(), decay=0.9, foreach=False)
    weight = torch.zeros(())
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        reference.step(model.parameters())
        ours.optimization_step += 1
        weight.fill_(1 - ours.get_decay(ours.optimization_step))
        ema_update_(ours.shadow_params, list(model.parameters()), weight)
    for a, b in zip(reference.shadow_params, ours.shadow_params):
        assert torch.equal(a, b)
    assert torch.equal(ours.shadow_params[1], frozen)  # frozen parameters are copied


def test_step_random_numbers_are_a_function_of_seed_step_and_process():
    assert step_seed(1, 2, 0) == step_seed(1, 2, 0)
    assert len({step_seed(1, 2, 0), step_seed(1, 3, 0), step_seed(1, 2, 1), step_seed(2, 2, 0)}) == 4
    r = StepRandom("cpu", seed=3)
    a = torch.randn(4, generator=r.reseed(10))
    torch.randn(100, generator=r.generator)
    assert torch.equal(torch.randn(4, generator=r.reseed(10)), a)


def test_device_batches_cover_an_epoch_per_process_and_resume_mid_epoch():
    single = DeviceIndexBatches(10, 3, seed=4, device="cpu")
    assert single.batches_per_epoch == 3  # the incomplete last batch is dropped
    epoch = [b["index"].tolist() for b in single.epoch(1)]
    assert sum(epoch, []) == epoch_permutation(10, 4, 1)[:9].tolist()
    assert [b["index"].tolist() for b in single.epoch(1, start=2)] == epoch[2:]
    shards = [DeviceIndexBatches(10, 2, 4, "cpu", process_index=r, num_processes=2) for r in range(2)]
    seen = [i for s in shards for b in s.epoch(0) for i in b["index"].tolist()]
    assert len(seen) == len(set(seen)) == 8
    with pytest.raises(ValueError, match="larger than"):
        DeviceIndexBatches(3, 4, 0, "cpu")


def test_image_cache_cuts_patches_and_flips_on_the_device():
    images = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8)
    cache = DeviceImageCache(images)
    g = torch.Generator().manual_seed(0)
    patches = cache.patches(torch.tensor([2, 0]), 5, g)
    assert patches.shape == (2, 3, 5, 5) and patches.min() >= -1 and patches.max() <= 1
    for k, i in enumerate((2, 0)):  # every patch is a window of its image
        full = images[i].float() / 127.5 - 1
        windows = [full[:, y:y + 5, x:x + 5] for y in range(8) for x in range(8)]
        assert any(torch.allclose(patches[k], w) for w in windows)
    whole = cache.patches(torch.tensor([1] * 32), 12, torch.Generator().manual_seed(1), random_flip=True)
    flipped = [torch.equal(p, (images[1].float() / 127.5 - 1).flip(-1)) for p in whole]
    assert 0 < sum(flipped) < 32  # about half
    with pytest.raises(ValueError, match="uint8"):
        DeviceImageCache(images.float())


def test_text_cache_draws_any_caption_of_a_sample_and_drops_on_request():
    embeds = torch.arange(5, dtype=torch.float32)[:, None, None].expand(5, 2, 3).clone()
    cache = TextEmbeddingCache(embeds, embeds[:, 0], torch.full((2, 3), -1.0), torch.full((3,), -1.0),
                               torch.tensor([0, 1, 4]), torch.tensor([1, 3, 1]))
    g = torch.Generator().manual_seed(0)
    picks = {int(cache.draw(torch.tensor([1]), g)[0][0, 0, 0]) for _ in range(60)}
    assert picks == {1, 2, 3}  # sample 1 has the captions in rows 1..3
    assert cache.get(torch.tensor([2, 0]))[0][:, 0, 0].tolist() == [4.0, 0.0]
    e, p = cache.draw(torch.tensor([0, 2]), g, proportion_empty=1.0)
    assert (e == -1).all() and (p == -1).all()


def test_caption_lists_are_all_cached(tmp_path):
    from datasets import Dataset
    from PIL import Image

    rows = Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2, "text": [["a", "b"], ["c"]]})
    ds = ImageCaptionDataset(rows, resolution=8)
    assert ds.all_captions() == [["a", "b"], ["c"]]
    seen = []

    def encode(captions):
        seen.extend(captions)
        return torch.zeros(len(captions), 2, 3), torch.zeros(len(captions), 3)

    cache = TextEmbeddingCache.build(ds.all_captions(), encode, path=tmp_path / "t.safetensors")
    assert seen == ["a", "b", "c", ""] and cache.sample_count.tolist() == [2, 1]
    assert TextEmbeddingCache.load(tmp_path / "t.safetensors").sample_start.tolist() == [0, 2]


def test_latent_cache_draws_flips_and_noise_from_the_generator():
    mean = torch.stack([torch.zeros(4, 2, 2), torch.ones(4, 2, 2)])[None].expand(6, 2, 4, 2, 2).clone()
    cache = LatentCache(mean, torch.zeros_like(mean))
    flips = cache.sample(torch.arange(6).repeat(10), None, torch.Generator().manual_seed(0))
    assert set(flips.flatten().tolist()) == {0.0, 1.0}  # both flips drawn, std 0
    a = cache.sample(torch.arange(6), None, torch.Generator().manual_seed(2))
    assert torch.equal(a, cache.sample(torch.arange(6), None, torch.Generator().manual_seed(2)))


def test_bad_arguments_end_with_one_line_and_exit_code_2(tmp_path, capsys):
    def parse():
        raise ValueError("--logging_steps must be >= 1, got 0.")

    with pytest.raises(SystemExit) as e:
        parse_or_exit(parse)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("error: --logging_steps must be >= 1, got 0.")
    proc = run_script("train_snapgen.py", ["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path),
                                           "--logging_steps", "0"], tmp_path / "hf", expect_success=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "train_snapgen.py: error: --logging_steps must be >= 1, got 0."
    with pytest.raises(ValueError, match="--compile_mode reduce-overhead"):
        _args(tmp_path, "--cuda_graphs", "--compile", "--compile_mode", "reduce-overhead")


def test_step_program_modes_and_capture_argument_checks(tmp_path):
    run, _ = _train(tmp_path / "p", "--max_train_steps", "1")
    assert StepProgram(run).mode == "eager"
    with pytest.raises(TypeError, match="CUDA tensors"):
        StepProgram(run)._capture([{"index": torch.tensor([0, 1])}], None, 0)
