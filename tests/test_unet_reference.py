"""The UNet computes the same function as the code that wrote ``fixtures/unet_reference.safetensors``.

The fixture holds inputs and outputs of two small UNets (multi-query attention with QK-norm and 2D RoPE; grouped-query
attention with a text mask) at a square and a non-square latent, written before the model's speed work. Weights come
from a seeded generator over the saved state-dict keys (``make_unet_reference.build``), so checkpoints of the old code
must keep loading into the new code and giving the same outputs.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_unet_reference import CONFIGS, SIZES, build  # noqa: E402

REFERENCE = FIXTURES / "unet_reference.safetensors"
CASES = [(name, height, width) for name in CONFIGS for height, width in SIZES]


def _case(name, height, width):
    prefix = f"{name}/{height}x{width}/"
    with safe_open(str(REFERENCE), "pt") as handle:
        tensors = {key[len(prefix):]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}
    inputs = {key[len("input/"):]: value for key, value in tensors.items() if key.startswith("input/")}
    return inputs, tensors["output"], tensors["output_bf16"]


def test_fixture_configs_are_the_ones_built_here():
    with safe_open(str(REFERENCE), "pt") as handle:
        stored = json.loads(handle.metadata()["configs"])
    for name in CONFIGS:
        config = {key: value for key, value in build(name).config.items() if not key.startswith("_")}
        assert json.loads(json.dumps(config, default=list)) == {
            key: value for key, value in stored[name].items() if not key.startswith("_")
        }


@pytest.mark.parametrize("name,height,width", CASES)
def test_float32_outputs_match_the_frozen_reference(name, height, width):
    unet = build(name)
    inputs, expected, _ = _case(name, height, width)
    with torch.no_grad():
        out = unet(**inputs).sample
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bfloat16_is_as_close_to_float32_as_the_frozen_code(name):
    """In bf16 the outputs stay within the old code's own bf16 error (these tiny random nets amplify rounding)."""
    unet = build(name).to(torch.bfloat16)
    inputs, expected, old_bf16 = _case(name, *SIZES[1])
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        out = unet(**inputs).sample.float()
    old_error = (old_bf16 - expected).norm()
    assert 0 < old_error / expected.norm() < 0.5
    assert (out - expected).norm() < 1.5 * old_error
    assert (out - old_bf16).norm() < 0.5 * old_error
