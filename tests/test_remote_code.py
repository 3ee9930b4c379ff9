"""A saved pipeline with `add_remote_code` loads without `import diffusers_snapgen` (trust_remote_code), and
still loads as before with the import, from a folder and from an offline Hub cache."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import build_hub_cache
from diffusers import DiffusionPipeline

from diffusers_snapgen import SnapGenPipeline, SnapGenUNet2DModel
from diffusers_snapgen.remote_code import COMPONENT_FILE, PIPELINE_FILE, add_remote_code
from diffusers_snapgen.testing import tiny_pipeline

_WITHOUT_IMPORT = """
import sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline="pipeline_snapgen", trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
out = pipe("a red apple", height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="latent")
torch.save(out.images, sys.argv[2])
print(type(pipe).__name__, type(pipe.unet).__name__, type(pipe.vae).__name__, "diffusers_snapgen" in sys.modules)
"""


def _latents(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red apple", height=32, width=32, generator=torch.Generator().manual_seed(0),
                output_type="latent").images


@pytest.fixture(scope="module")
def remote_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote") / "tiny-snapgen"
    tiny_pipeline("clip", "tiny").save_pretrained(folder)
    written = add_remote_code(folder)
    assert sorted(p.relative_to(folder).as_posix() for p in written) == sorted(
        [f"unet/{COMPONENT_FILE}", f"vae/{COMPONENT_FILE}", PIPELINE_FILE])
    return folder


def test_loads_without_importing_the_package(remote_folder, tmp_path):
    out = tmp_path / "latents.pt"
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_IMPORT, str(remote_folder), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["SnapGenPipeline", "SnapGenUNet2DModel", "TinyDecoder", "False"]
    # Same code path, another process: equal up to float32 rounding (thread counts change reduction order).
    torch.testing.assert_close(torch.load(out), _latents(tiny_pipeline("clip", "tiny")), rtol=1e-5, atol=1e-6)


def test_with_the_import_the_code_files_are_ignored(remote_folder):
    repo_id = "snapgen-test/remote-code"
    build_hub_cache(remote_folder, repo_id, with_tree_listing=True)
    for source in (str(remote_folder), repo_id):
        pipe = DiffusionPipeline.from_pretrained(source)  # no trust_remote_code needed
        assert type(pipe) is SnapGenPipeline and type(pipe.unet) is SnapGenUNet2DModel


@pytest.mark.parametrize("folder, error", [(3, TypeError), ("./no/such/folder", ValueError)])
def test_bad_folders_are_named(folder, error):
    with pytest.raises(error, match="`folder`"):
        add_remote_code(folder)
