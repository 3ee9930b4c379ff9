"""`--use_ema` / `--foreach_ema` (src/diffusers_snapgen/training/loop.py `build_ema`): diffusers' EMAModel, with its
foreach update on request; both updates give the same shadow weights."""

import pytest
import torch

from diffusers_snapgen.testing import tiny_unet
from diffusers_snapgen.training import parse_args
from diffusers_snapgen.training.loop import build_ema


def _args(tmp_path, *extra):
    return parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", str(tmp_path),
                       "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--ema_decay", "0.9", *extra])


def test_foreach_ema_tracks_the_same_weights_as_the_per_parameter_update(tmp_path):
    student = tiny_unet()
    plain, foreach = (build_ema(_args(tmp_path, "--use_ema", *extra), student)
                       for extra in ((), ("--foreach_ema",)))
    assert (plain.foreach, foreach.foreach) == (False, True)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # move the student, then step both EMAs
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        plain.step(student.parameters())
        foreach.step(student.parameters())
    moved = [s for s, p in zip(plain.shadow_params, student.parameters()) if not torch.equal(s, p)]
    assert moved  # the shadow lags the student: the EMA did update
    for a, b in zip(plain.shadow_params, foreach.shadow_params):
        torch.testing.assert_close(a, b)


def test_build_ema_is_off_without_use_ema_and_rejects_non_models(tmp_path):
    assert build_ema(_args(tmp_path, "--foreach_ema"), tiny_unet()) is None
    with pytest.raises(TypeError, match="student"):
        build_ema(_args(tmp_path, "--use_ema"), torch.nn.Linear(2, 2))
