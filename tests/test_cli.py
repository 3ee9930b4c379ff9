"""The ``snapgen`` command line, run in-process through ``diffusers_snapgen.cli.main``."""

from __future__ import annotations

import configparser
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import build_hub_cache
from PIL import Image

from diffusers_snapgen import cli

SMALL = ["--height", "32", "--width", "64", "--seed", "7", "--device", "cpu", "--dtype", "float32"]


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_is_declared():
    config = configparser.ConfigParser()
    config.read(Path(__file__).parents[1] / "setup.cfg")
    assert "snapgen = diffusers_snapgen.cli:main" in config["options.entry_points"]["console_scripts"]


def test_generate_writes_the_image_and_prints_its_path(saved_pipeline, tmp_path, capsys):
    target = tmp_path / "apple.png"
    code, out, err = run(capsys, "generate", "a red apple", "--model", str(saved_pipeline), "-o", str(target), *SMALL)
    assert code == 0, err
    assert out.strip().splitlines() == [str(target)]
    with Image.open(target) as image:
        assert image.size == (64, 32)
        first = np.asarray(image)
    # same seed, same image
    again = tmp_path / "again.png"
    assert run(capsys, "generate", "a red apple", "-m", str(saved_pipeline), "-o", str(again), *SMALL)[0] == 0
    with Image.open(again) as image:
        np.testing.assert_array_equal(np.asarray(image), first)


def test_generate_several_images_into_a_folder(saved_pipeline, tmp_path, capsys):
    folder = tmp_path / "out"
    code, out, err = run(capsys, "generate", "A red apple!", "-m", str(saved_pipeline), "--num-images", "2",
                         "--steps", "1", "--guidance-scale", "2.0", "--negative-prompt", "blurry",
                         "--output", str(folder), *SMALL)
    assert code == 0, err
    paths = [Path(p) for p in out.split()]
    assert [p.name for p in paths] == ["a-red-apple-7-0.png", "a-red-apple-7-1.png"]
    assert all(p.is_file() and p.parent == folder for p in paths)
    assert "Traceback" not in err


def test_generate_from_a_hub_repo_id_offline(saved_pipeline, tmp_path, capsys):
    build_hub_cache(saved_pipeline, "snapgen-test/cli-repo")
    code, out, err = run(capsys, "generate", "a red apple", "-m", "snapgen-test/cli-repo",
                         "-o", str(tmp_path / "hub.png"), *SMALL)
    assert code == 0, err
    assert out.strip() == str(tmp_path / "hub.png")
    assert (tmp_path / "hub.png").is_file()


def test_info_prints_components_parameters_and_scheduler(saved_pipeline, capsys):
    code, out, err = run(capsys, "info", str(saved_pipeline))
    assert code == 0, err
    for text in ("SnapGenUNet2DModel", "TinyDecoder", "CLIPTextModelWithProjection", "shift: 3.0",
                 "default steps: 2", "default image size: 64x64"):
        assert text in out
    code, out, err = run(capsys, "info", str(saved_pipeline), "--json")
    summary = json.loads(out)
    from diffusers_snapgen.testing import tiny_pipeline

    expected = sum(p.numel() for p in tiny_pipeline("clip", "tiny").unet.parameters())
    assert summary["components"]["unet"]["parameters"] == expected
    assert summary["scheduler"]["defaults_from"] == "_snapgen_defaults"


def test_other_modules_can_add_subcommands(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_SUBCOMMANDS", dict(cli._SUBCOMMANDS))
    calls = []
    cli.register_subcommand(
        "plugin-demo", "a subcommand added by another module",
        configure=lambda parser: parser.add_argument("--bits", type=int, default=16),
        run=lambda args: calls.append(args.bits) or 0,
    )
    assert run(capsys, "plugin-demo", "--bits", "6")[0] == 0
    assert calls == [6]
    with pytest.raises(ValueError, match="already registered"):
        cli.register_subcommand("plugin-demo", "again", lambda p: None, lambda a: 0)
    with pytest.raises(ValueError, match="`name`"):
        cli.register_subcommand("Bad Name", "x", lambda p: None, lambda a: 0)


# --------------------------------------------------------------------------- bad input: one line, exit code 2

def test_generate_with_a_lora_folder_file_and_scale(saved_pipeline, tmp_path, capsys):
    import torch
    from peft import LoraConfig

    from diffusers_snapgen import SnapGenUNet2DModel
    from diffusers_snapgen.training.lora import save_lora_adapter

    unet = SnapGenUNet2DModel.from_pretrained(saved_pipeline, subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    weights = save_lora_adapter(unet, tmp_path / "lora")

    def image(name, *extra):
        code, out, err = run(capsys, "generate", "a red apple", "-m", str(saved_pipeline), "-o",
                             str(tmp_path / name), *SMALL, *extra)
        assert code == 0, err
        with Image.open(tmp_path / name) as im:
            return np.asarray(im)

    base = image("base.png")
    adapted = image("lora.png", "--lora", str(tmp_path / "lora"))
    assert not np.array_equal(adapted, base)
    np.testing.assert_array_equal(image("file.png", "--lora", str(weights)), adapted)
    np.testing.assert_array_equal(image("off.png", "--lora", str(weights), "--lora-scale", "0"), base)
    assert not np.array_equal(image("half.png", "--lora", str(weights), "--lora_scale", "0.5"), adapted)


BAD = [
    ("lora-folder-without-weights", ["generate", "x", "-m", "{model}", "--lora", "{tmp}"], "--lora"),
    ("lora-not-safetensors", ["generate", "x", "-m", "{model}", "--lora", "{tmp}/a-file"], "--lora"),
    ("lora-scale-without-lora", ["generate", "x", "-m", "{model}", "--lora-scale", "0.5"], "--lora"),
    ("lora-scale-not-a-number", ["generate", "x", "-m", "{model}", "--lora-scale", "big"], "--lora-scale"),
    ("height-not-multiple", ["generate", "x", "-m", "{model}", "--height", "33"], "--height"),
    ("width-zero", ["generate", "x", "-m", "{model}", "--width", "0"], "--width"),
    ("steps-zero", ["generate", "x", "-m", "{model}", "--steps", "0"], "--steps"),
    ("num-images-text", ["generate", "x", "-m", "{model}", "--num-images", "two"], "--num-images"),
    ("guidance-negative", ["generate", "x", "-m", "{model}", "--guidance-scale", "-2"], "--guidance-scale"),
    ("unknown-dtype", ["generate", "x", "-m", "{model}", "--dtype", "int8"], "--dtype"),
    ("bad-output-extension", ["generate", "x", "-m", "{model}", "-o", "{tmp}/image.txt"], "--output"),
    ("model-not-a-folder", ["generate", "x", "-m", "{tmp}/missing"], "--model"),
    ("model-not-snapgen", ["generate", "x", "-m", "{tmp}", "--device", "cpu"], "--model"),
    ("model-corrupt", ["generate", "x", "-m", "{corrupt}", "--device", "cpu"], "safetensors"),
    ("device-unknown", ["generate", "x", "-m", "{model}", "--device", "toaster"], "--device"),
    ("seed-too-large", ["generate", "x", "-m", "{model}", "--seed", str(2**70)], "--seed"),
    ("seed-negative", ["generate", "x", "-m", "{model}", "--seed", "-1"], "--seed"),
    ("output-under-a-file", ["generate", "x", "-m", "{model}", "-o", "{tmp}/a-file/sub/image.png"], "--output"),
    ("size-too-large-for-cpu", ["generate", "x", "-m", "{model}", "--height", "8192", "--width", "8192",
                                "--device", "cpu"], "--allow-large"),
    ("repo-not-cached", ["info", "snapgen-test/not-cached"], "MODEL"),
    ("info-not-snapgen", ["info", "{tmp}"], "MODEL"),
    ("unknown-command", ["paint", "x"], "paint"),
    ("missing-prompt", ["generate"], "prompt"),
]


@pytest.mark.parametrize("argv, needle", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_on_stderr_and_exit_2(saved_pipeline, tmp_path, capsys, argv, needle):
    corrupt = tmp_path / "corrupt"
    if "{corrupt}" in argv:
        import shutil

        shutil.copytree(saved_pipeline, corrupt)
        next((corrupt / "unet").glob("*.safetensors")).write_bytes(b"garbage" * 10)
    (tmp_path / "a-file").write_text("not a folder")
    argv = [a.format(model=saved_pipeline, tmp=tmp_path, corrupt=corrupt) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0] and "error" in lines[0] and "Traceback" not in err
    assert out == ""


@pytest.mark.parametrize("module", ["diffusers_snapgen", "diffusers_snapgen.cli"])
def test_python_dash_m_sees_every_subcommand(module):
    """`python -m` must run the imported cli module, where `eval` and `convert-coreml` register themselves."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("generate", "info", "eval", "convert-coreml"):
        assert name in proc.stdout


def test_an_unwritable_output_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """The output folder is checked first: a missing model would be the error otherwise."""
    (tmp_path / "a-file").write_text("x")
    code, out, err = run(capsys, "generate", "x", "-m", str(tmp_path / "no-such-model"),
                         "-o", str(tmp_path / "a-file" / "sub" / "image.png"))
    assert code == 2 and "--output" in err and "cannot write" in err and "no-such-model" not in err


def test_float16_on_the_cpu_is_one_warning_line(saved_pipeline, tmp_path, capsys):
    small = [a if a != "float32" else "float16" for a in SMALL]
    code, out, err = run(capsys, "generate", "x", "-m", str(saved_pipeline), "-o", str(tmp_path / "h.png"), *small)
    assert code == 0, err
    assert sum("float16" in line for line in err.splitlines()) == 1
    assert "will fail" not in err and "cannot run with" not in err


def test_large_images_on_the_cpu_run_with_allow_large(saved_pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "MAX_CPU_PIXELS", 32 * 32)  # the tiny model stands in for a slow one
    argv = ["generate", "x", "-m", str(saved_pipeline), "-o", str(tmp_path / "big.png"), "--steps", "1", *SMALL]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "--allow-large" in err
    code, _, err = run(capsys, *argv, "--allow-large")
    assert code == 0, err
    assert (tmp_path / "big.png").is_file()


def test_python_api_flag_names_become_cli_flags_in_errors(monkeypatch, capsys):
    """Errors raised by the Python API under a subcommand (e.g. Core ML's "pass overwrite=True") name the flag."""
    monkeypatch.setattr(cli, "_SUBCOMMANDS", dict(cli._SUBCOMMANDS))

    def fail(args):
        raise FileExistsError("`output_dir` out is not empty: choose a new folder or pass overwrite=True.")

    cli.register_subcommand("flag-demo", "x", lambda p: p.add_argument("--overwrite", action="store_true"), fail)
    code, _, err = run(capsys, "flag-demo")
    assert code == 2 and "pass --overwrite." in err and "overwrite=True" not in err


_IMPORTS_AFTER = """
import sys
from diffusers_snapgen.cli import main
for argv in ({argvs}):
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    print(code, sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
"""


def test_help_and_argument_errors_do_not_import_torch():
    import subprocess
    import sys

    argvs = '["--help"], ["generate", "--help"], ["convert-coreml", "--help"], ["generate", "x", "--steps", "0"], []'
    proc = subprocess.run([sys.executable, "-c", _IMPORTS_AFTER.format(argvs=argvs)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line for line in lines if line[:2] in ("0 ", "2 ")] == ["0 []", "0 []", "0 []", "2 []", "2 []"], proc.stdout + proc.stderr


def test_declared_help_of_lazy_subcommands_matches_their_modules():
    import importlib

    for name, (module, help) in cli.SUBCOMMAND_MODULES.items():
        importlib.import_module(module)
        assert cli._SUBCOMMANDS[name].help == help
