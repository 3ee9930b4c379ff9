"""The emoji classifier, the model comparison harness and `snapgen eval`, on a tiny rendered set and tiny pipelines."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_emoji_data import make_dataset

from diffusers_snapgen.cli import main
from diffusers_snapgen.evaluation import (
    EmojiClassifier,
    evaluate_models,
    generate_images,
    load_classifier,
    load_model,
    load_rendered,
    parse_model_spec,
    prompt_accuracy,
    read_eval_prompts,
    read_rendered,
    save_classifier,
    train_classifier,
    write_report,
)
from diffusers_snapgen.evaluation.metrics import round_trip
from diffusers_snapgen.testing import tiny_pipeline

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_quality.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("emoji"), resolution=32)


@pytest.fixture(scope="module")
def rendered(data_dir):
    return load_rendered(data_dir)


@pytest.fixture(scope="module")
def classifier(rendered):
    images, texts, _ = rendered
    return train_classifier(images, texts, image_size=32, widths=(8, 16, 32), epochs=60, batch_size=16,
                            learning_rate=1e-2, seed=0)


def tiny_teacher(seed=0):
    """A tiny SD3Transformer2DModel conditioned like tiny_pipeline("generic") (BERT width 16, 4 latent channels)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16).eval()


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    tiny_pipeline("generic", vae="kl").save_pretrained(root / "base")  # text encoder + AutoencoderKL + scheduler
    tiny_pipeline("generic", vae="tiny", seed=3).save_pretrained(root / "student")
    tiny_teacher().save_pretrained(root / "teacher")
    return {name: root / name for name in ("base", "student", "teacher")}


def test_loader_reads_captions_and_names(rendered, data_dir):
    images, texts, names = rendered
    assert len(images) == 10 and images[0].size == (32, 32) and images[0].mode == "RGB"
    assert texts[names.index("artist-dark")] == "artist"
    assert set(read_eval_prompts(data_dir)) == {"heldout", "seen"}
    with pytest.raises(ValueError, match="prepare_emoji"):
        load_rendered(data_dir / "train")
    with pytest.raises(ValueError, match="split"):
        load_rendered(data_dir, "validation")


def test_classifier_recognises_the_rendered_set(classifier, rendered):
    images, texts, _ = rendered
    assert classifier.classes == sorted(set(texts)) and len(classifier.classes) == 8
    right = prompt_accuracy(images, texts, classifier)
    assert right["top1"] >= 0.8 and right["top5"] == 1.0  # chance: 1/8 and 5/8
    wrong = prompt_accuracy(images, texts[3:] + texts[:3], classifier)
    assert wrong["top1"] <= 0.3
    features = classifier.embed(images)
    assert features.shape == (10, 32) and torch.isfinite(features).all()
    log = classifier.training_log
    assert len(log) == 60 and log[-1]["loss"] < log[0]["loss"]


def test_classifier_save_load_round_trip(classifier, rendered, tmp_path):
    images = rendered[0]
    path = save_classifier(classifier, tmp_path / "sub" / "clf.safetensors")
    loaded = load_classifier(path)
    assert loaded.classes == classifier.classes and loaded.image_size == 32
    assert torch.equal(loaded.logits(images), classifier.logits(images))
    assert [p.name for p in path.parent.iterdir()] == ["clf.safetensors"]  # no temporary file left
    with pytest.raises(ValueError, match=".safetensors"):
        save_classifier(classifier, tmp_path / "clf.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_classifier(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an emoji classifier"):
        load_classifier(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="one per image"):
        train_classifier(images, ["a"], epochs=1)


def test_model_specs():
    assert parse_model_spec("asd=runs/asd:4").steps == 4
    spec = parse_model_spec("teacher=/data/c:x/teacher:28:4.5")
    assert (spec.name, spec.path, spec.steps, spec.guidance_scale) == ("teacher", "/data/c:x/teacher", 28, 4.5)
    for bad in ("runs/asd:4", "asd=runs/asd", "asd=runs/asd:0", "a b=x:4"):
        with pytest.raises(ValueError, match="--models"):
            parse_model_spec(bad)


def test_same_seeds_give_the_same_images_whatever_the_batch():
    pipe = tiny_pipeline("generic")
    prompts, seeds = ["red apple", "artist", "blue square"], [5, 6, 7]
    together = generate_images(pipe, prompts, seeds, steps=2, batch_size=3)
    alone = generate_images(pipe, prompts, seeds, steps=2, batch_size=1)
    assert together.dtype == torch.uint8 and together.shape == (3, 3, 64, 64)
    assert torch.equal(together, alone)
    assert not torch.equal(together, generate_images(pipe, prompts, [8, 9, 10], steps=2))
    with pytest.raises(ValueError, match="autocast"):
        generate_images(pipe, prompts, seeds, steps=2, autocast=torch.float32)


def test_teacher_transformer_samples_through_a_base_pipeline(saved_models):
    with pytest.raises(ValueError, match="--base"):
        load_model(saved_models["teacher"])
    with pytest.raises(ValueError, match="neither"):
        load_model(saved_models["teacher"].parent)
    teacher = load_model(saved_models["teacher"], base=saved_models["base"])
    assert type(teacher.unet.transformer).__name__ == "SD3Transformer2DModel"
    images = generate_images(teacher, ["red apple", "artist"], [0, 1], steps=2)
    assert images.shape == (2, 3, 64, 64) and images.float().std() > 0


def test_shipped_model_without_text_encoder_borrows_the_base_encoder(saved_models, tmp_path):
    """The embedded default model ships without its text encoder; evaluation takes the base pipeline's."""
    from diffusers_snapgen import SnapGenPipeline

    student = SnapGenPipeline.from_pretrained(str(saved_models["student"]))
    SnapGenPipeline(unet=student.unet, vae=student.vae, scheduler=student.scheduler).save_pretrained(tmp_path / "ship")
    with pytest.raises(ValueError, match="no text encoder"):
        load_model(tmp_path / "ship")
    shipped = load_model(tmp_path / "ship", base=saved_models["base"])
    assert shipped.text_encoder_mode == "generic"
    base = SnapGenPipeline.from_pretrained(str(saved_models["base"]))
    expected = SnapGenPipeline(unet=student.unet, vae=student.vae, scheduler=student.scheduler,
                               text_encoder=base.text_encoder, tokenizer=base.tokenizer)
    expected.set_progress_bar_config(disable=True)
    images = generate_images(shipped, ["red apple"], [4], steps=2)
    assert torch.equal(images, generate_images(expected, ["red apple"], [4], steps=2))


def test_evaluate_models_one_table_and_grid(classifier, rendered, data_dir, saved_models, tmp_path):
    images, texts, _ = rendered
    student = tiny_pipeline("generic", vae="kl")
    teacher = load_model(saved_models["teacher"], base=saved_models["base"])
    models = [("teacher", teacher, 3, 1.0), ("student", student, 2), ("student_again", lambda: student, 2),
              ("student_4", student, 4)]
    prompts = read_eval_prompts(data_dir)
    result = evaluate_models(models, prompts, classifier, reference_features=classifier.embed(images),
                             rendered={t: i for t, i in zip(texts, images)}, images_per_prompt=2, seed=10,
                             encoder=student.vae, decoder_images=load_rendered(data_dir, "test")[0][:2])
    assert [row["model"] for row in result.rows] == ["rendered", "autoencoder", "teacher", "student", "student_again",
                                                     "student_4"]
    assert result.seeds == [10, 11] * 4 and result.groups.count("heldout") == 4  # copy j of every prompt: seed 10 + j
    assert torch.equal(result.images["student"], result.images["student_again"])  # same prompts and seeds
    assert not torch.equal(result.images["student"], result.images["student_4"])
    rows = {row["model"]: row for row in result.rows}
    for key in ("top1_heldout", "top5_seen", "fid", "prompt_seed_ratio", "psnr", "ssim"):
        assert rows["student"][key] == rows["student_again"][key]
    assert rows["student"]["prompt_seed_ratio"] > 0 and rows["rendered"]["prompt_seed_ratio"] is None
    assert rows["rendered"]["top1_seen"] >= rows["student"]["top1_seen"] and rows["rendered"]["psnr"] is None
    assert rows["rendered"]["fid"] < rows["student"]["fid"]  # the data's own images are closest to the data
    # the autoencoder row: the rendered images through the encoder's round trip, copies of one prompt identical
    first = result.images["rendered"][0:1].float() / 255
    expected = (round_trip(first, student.vae, student.vae) * 255).round().to(torch.uint8)
    assert torch.equal(result.images["autoencoder"][0:1], expected)
    assert torch.equal(result.images["autoencoder"][0], result.images["autoencoder"][1])
    assert not torch.equal(result.images["autoencoder"], result.images["rendered"])
    assert rows["autoencoder"]["prompt_seed_ratio"] is None and rows["autoencoder"]["fid"] is not None
    paths = write_report(result, tmp_path / "report", grid_prompts=3, cell_size=32, seed_grid_model="student",
                         seed_grid_prompts=16)
    table = json.loads(paths["json"].read_text())
    assert [row["model"] for row in table["rows"]] == [row["model"] for row in result.rows]
    assert table["columns"][:5] == ["model", "steps", "guidance", "top1_heldout", "top5_heldout"]
    markdown = paths["markdown"].read_text()
    assert "| student_4 | 4 |" in markdown and "top-1 heldout" in markdown
    grid = Image.open(paths["grid"])
    assert grid.size == (150 + 6 * (32 + 4), 22 + 3 * (32 + 4))
    seeds = Image.open(paths["seeds"])  # 4 prompts (all there are) x (rendered + 2 seeds)
    assert seeds.size == (150 + 3 * (32 + 4), 22 + 4 * (32 + 4))
    with pytest.raises(ValueError, match="seed_grid_model"):
        write_report(result, tmp_path / "other", seed_grid_model="rendered")
    assert sorted(p.name for p in paths["grid"].parent.iterdir()) == sorted(p.name for p in paths.values())
    with pytest.raises(ValueError, match="not classes"):
        evaluate_models(models[1:2], ["a red apple on a table"], classifier)
    with pytest.raises(ValueError, match="distinct"):
        evaluate_models([("a", student, 2), ("a", student, 2)], ["artist"], classifier)
    with pytest.raises(ValueError, match="steps"):
        evaluate_models([("a", student, 0)], ["artist"], classifier)


def test_snapgen_eval_cli_trains_then_compares(data_dir, saved_models, tmp_path, capsys):
    clf = tmp_path / "clf.safetensors"
    assert main(["eval", "--data", str(data_dir), "--classifier", str(clf), "--train-classifier",
                 "--classifier-epochs", "3", "--classifier-size", "32", "--device", "cpu"]) == 0
    assert load_classifier(clf).image_size == 32
    out = tmp_path / "results"
    spec = importlib.util.spec_from_file_location("eval_quality", BENCHMARK)
    wrapper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrapper)
    code = wrapper.main(["--data", str(data_dir), "--classifier", str(clf), "--out", str(out), "--device", "cpu",
                         "--models", f"student={saved_models['student']}:2", f"teacher={saved_models['teacher']}:2:1.0",
                         "--base", str(saved_models["base"]), "--encoder", str(saved_models["base"]),
                         "--decoder-images", "2", "--prompt-sets", "heldout", "--max-prompts", "1"])
    assert code == 0, capsys.readouterr().err
    table = json.loads((out / "eval_quality.json").read_text())
    assert [row["model"] for row in table["rows"]] == ["rendered", "autoencoder", "student", "teacher"]
    assert table["rows"][2]["psnr"] is not None and table["settings"]["models"]["teacher"].endswith("teacher")
    assert (out / "eval_quality_grid.png").is_file() and (out / "eval_quality.md").is_file()
    assert wrapper.RESULTS.name == "results"
    assert [p["prompt"] for p in table["prompts"]] == read_eval_prompts(data_dir)["heldout"][:1]

    skipped = tmp_path / "skipped"  # --skip-prompts: the next prompt of the set instead of the first
    assert main(["eval", "--data", str(data_dir), "--classifier", str(clf), "--out", str(skipped), "--device", "cpu",
                 "--models", f"student={saved_models['student']}:2", "--prompt-sets", "heldout", "--max-prompts", "1",
                 "--skip-prompts", "1", "--no-rendered-row"]) == 0
    table = json.loads((skipped / "eval_quality.json").read_text())
    assert [p["prompt"] for p in table["prompts"]] == read_eval_prompts(data_dir)["heldout"][1:2]
    assert table["settings"]["skip_prompts"] == 1


def test_a_model_that_fails_mid_run_keeps_the_other_rows(classifier, tmp_path):
    student = tiny_pipeline("generic")

    def broken():
        raise RuntimeError("weights are corrupt")

    models = [("first", student, 2), ("broken", broken, 2), ("last", student, 2)]
    with pytest.raises(RuntimeError, match="corrupt"):  # by default the error ends the evaluation
        evaluate_models(models, ["artist", "red apple"], classifier)
    result = evaluate_models(models, ["artist", "red apple"], classifier, continue_on_error=True)
    assert [row["model"] for row in result.rows] == ["first", "broken", "last"]
    assert result.failed == {"broken": "RuntimeError: weights are corrupt"}
    assert list(result.images) == ["first", "last"] and torch.equal(result.images["first"], result.images["last"])
    rows = {row["model"]: row for row in result.rows}
    assert rows["last"]["top1_all"] == rows["first"]["top1_all"] and "error" not in rows["last"]
    paths = write_report(result, tmp_path, cell_size=32, seed_grid_model="last")
    table = json.loads(paths["json"].read_text())
    assert table["columns"][-1] == "error" and table["rows"][1]["error"] == "RuntimeError: weights are corrupt"
    assert table["rows"][2]["error"] is None
    assert "| broken | 2 | — |" in paths["markdown"].read_text()
    assert Image.open(paths["grid"]).size[0] == 150 + 2 * (32 + 4)  # the two evaluated models
    healthy = evaluate_models(models[:1], ["artist"], classifier, continue_on_error=True)
    assert healthy.failed == {} and "error" not in healthy.columns()
    with pytest.raises(TypeError, match="continue_on_error"):
        evaluate_models(models[:1], ["artist"], classifier, continue_on_error="yes")


def test_snapgen_eval_writes_the_table_when_a_model_breaks_mid_run(data_dir, saved_models, classifier, tmp_path,
                                                                    capsys):
    """A folder that passes the up-front check but whose weights do not load: the other models' rows are written
    and the exit status is 1."""
    clf = save_classifier(classifier, tmp_path / "clf.safetensors")
    broken = tmp_path / "broken"
    shutil.copytree(saved_models["student"], broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:64])
    out = tmp_path / "results"
    code = main(["eval", "--data", str(data_dir), "--classifier", str(clf), "--out", str(out), "--device", "cpu",
                 "--models", f"student={saved_models['student']}:2", f"broken={broken}:2", "--prompt-sets", "heldout",
                 "--max-prompts", "1", "--no-rendered-row", "--seed-grid", "broken"])
    err = capsys.readouterr().err
    assert code == 1 and "broken could not be evaluated" in err
    table = json.loads((out / "eval_quality.json").read_text())
    assert [row["model"] for row in table["rows"]] == ["student", "broken"]
    assert table["rows"][0]["top1_heldout"] is not None and table["rows"][1]["error"]
    assert (out / "eval_quality_seeds.png").is_file()  # of the model that was evaluated


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "student"], "NAME=PATH:STEPS"),
        ([], "nothing to do"),
        (["--models", "s=x:2"], "--out is required"),
        (["--models", "s=x:2", "--out", "o", "--prompt-sets", "nope"], "not in eval_prompts.json"),
        (["--models", "s=x:2", "--out", "o", "--batch-size", "0"], "--batch-size"),
        (["--models", "s=x:2", "--out", "o", "--skip-prompts", "1000"], "--skip-prompts 1000 leaves no prompt"),
    ],
)
def test_snapgen_eval_errors_are_one_line(data_dir, tmp_path, capsys, argv, message):
    code = main(["eval", "--data", str(data_dir), "--classifier", str(tmp_path / "c.safetensors"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_snapgen_eval_checks_every_model_folder_before_any_work(data_dir, saved_models, tmp_path, capsys):
    classifier = tmp_path / "c.safetensors"
    for model, message in [(tmp_path / "typo", "is not a folder"), (tmp_path, "neither a pipeline folder"),
                           (saved_models["teacher"], "pass --base")]:
        code = main(["eval", "--data", str(data_dir), "--classifier", str(classifier), "--train-classifier",
                     "--models", f"student={saved_models['student']}:2", f"last={model}:2", "--out",
                     str(tmp_path / "o"), "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0] and str(model) in err[0]
    assert not classifier.exists() and not (tmp_path / "o").exists()  # failed before training or sampling


def test_snapgen_eval_missing_classifier_and_data(data_dir, saved_models, tmp_path, capsys):
    code = main(["eval", "--data", str(data_dir), "--classifier", str(tmp_path / "none.safetensors"),
                 "--models", f"s={saved_models['student']}:2", "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert code == 2 and "train one with" in capsys.readouterr().err
    code = main(["eval", "--data", str(tmp_path), "--classifier", "c.safetensors", "--train-classifier"])
    assert code == 2 and "prepare_emoji.py" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_emoji_classifier_is_exported():
    from diffusers_snapgen import evaluation

    assert evaluation.EmojiClassifier is EmojiClassifier and "evaluate_models" in evaluation.__all__


# --------------------------------------------------------------------------- several styles


def styled_shapes(size: int = 32):
    """Six concepts (shapes) drawn in three styles (filled, outlined, other colours): images, concepts, styles."""
    from PIL import ImageDraw

    shapes = {
        "circle": lambda d, box, **kw: d.ellipse(box, **kw),
        "square": lambda d, box, **kw: d.rectangle(box, **kw),
        "triangle": lambda d, box, **kw: d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2,
                                                                                         box[1])], **kw),
        "bar": lambda d, box, **kw: d.rectangle((box[0], size * 0.4, box[2], size * 0.6), **kw),
        "column": lambda d, box, **kw: d.rectangle((size * 0.4, box[1], size * 0.6, box[3]), **kw),
        "cross": lambda d, box, **kw: d.line((box[0], box[1], box[2], box[3]), width=4, **{"fill": kw.get(
            "fill") or kw.get("outline")}),
    }
    styles = {"flat": {"fill": "#e03030"}, "line": {"outline": "#202020", "width": 3}, "cool": {"fill": "#3070e0"}}
    images, concepts, names = [], [], []
    for concept, draw in shapes.items():
        for style, kwargs in styles.items():
            image = Image.new("RGB", (size, size), "white")
            box = (size * 0.15, size * 0.15, size * 0.85, size * 0.85)
            draw(ImageDraw.Draw(image), box, **kwargs)
            images.append(image)
            concepts.append(concept)
            names.append(style)
    return images, concepts, names


def test_classifier_learns_concepts_across_styles_within_a_time_budget():
    images, concepts, styles = styled_shapes()
    model = train_classifier(images, concepts, image_size=32, widths=(8, 16, 32), epochs=80, batch_size=6,
                             learning_rate=1e-2, seed=0)
    assert model.classes == sorted(set(concepts))  # one class per concept, not per (concept, style)
    prompts = [f"{c}, {s} style" for c, s in zip(concepts, styles)]
    assert prompt_accuracy(images, prompts, model)["top1"] >= 0.9  # chance: 1/6
    assert [entry["epoch"] for entry in model.training_log] == list(range(1, 81))
    budget = train_classifier(images, concepts, image_size=32, widths=(8,), epochs=10**6, batch_size=6,
                              max_seconds=0.5, mixed_precision=True)
    assert 1 <= len(budget.training_log) < 10**6  # stopped by the time budget, in bfloat16 autocast
    with pytest.raises(ValueError, match="max_seconds"):
        train_classifier(images, concepts, epochs=1, max_seconds=0)


def test_snapgen_eval_on_several_styles_reports_both_heldout_kinds(saved_models, tmp_path, capsys):
    from test_emoji_sets import FIXTURES, SET_KEYS, build, load_script

    data = build(load_script(), tmp_path, "emoji", ["--iconify-json", *(str(FIXTURES / k) for k in SET_KEYS),
                                                    "--unicode-names", str(FIXTURES / "names.json")])
    rendered = read_rendered(data)
    assert len(rendered) == 27 and set(rendered.kinds) == {"seen", "heldout_pair", "heldout_concept"}
    assert rendered.concepts[rendered.texts.index("red apple, noto style")] == "red apple"
    clf, out = tmp_path / "clf.safetensors", tmp_path / "results"
    code = main(["eval", "--data", str(data), "--classifier", str(clf), "--train-classifier", "--device", "cpu",
                 "--classifier-epochs", "20", "--classifier-size", "32", "--classifier-widths", "8", "16",
                 "--classifier-batch-size", "9", "--models", f"student={saved_models['student']}:2",
                 "--base", str(saved_models["base"]), "--images-per-prompt", "2", "--autocast", "bf16",
                 "--max-prompts", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "rendered-set top-1" in capsys.readouterr().err
    assert len(load_classifier(clf).classes) == len(set(rendered.concepts)) == 11
    table = json.loads((out / "eval_quality.json").read_text())
    for kind in ("seen", "heldout_pair", "heldout_concept"):
        assert f"top1_{kind}" in table["columns"] and f"top5_{kind}" in table["columns"]
    student = table["rows"][1]
    assert student["model"] == "student" and student["prompt_seed_ratio"] > 0
    assert table["settings"]["autocast"] == "bfloat16"
    assert {p["seed"] for p in table["prompts"]} == {0, 1}
    assert Image.open(out / "eval_quality_seeds.png").size[0] == 150 + 3 * (128 + 4)  # rendered + 2 seeds
