"""LoRA on the embedded default model, on a CPU: does it learn a new subject from 8 images, and do other prompts stay?

    python benchmarks/bench_lora_default_model.py --classifier runs/emoji_classifier.safetensors
        # writes benchmarks/results/lora_default_model_cpu.{json,md,jpg}
    python benchmarks/bench_lora_default_model.py --smoke --out /tmp/lora-smoke   # the same code path, ~1 minute

The model is the one the package embeds (``default``), at its native size with its own sampling defaults (steps,
CFG), so re-running after the model changes is this one command.

Subject. ``--subject`` (default ``flamingo``) must be a concept the model never saw. The emoji data split
(``training_examples/data/prepare_emoji.py``) holds whole concepts out of training; ``flamingo`` is one of them (an
unmistakable pink bird on one leg, drawn alike by Noto and Twemoji), while ``orca``, the subject of the first version
of this benchmark, is a training concept of the five-set model. With ``--data-dir`` (the rendered set the model was
trained on, e.g. the recipe's ``data/emoji128``) the drawings come from its held-out split and the script checks that
no training caption names the subject; without it they are rendered from the npm packages ``prepare_emoji.py`` uses
(``~/.cache/diffusers-snapgen``, ``--cache-dir``) and the split is recomputed with prepare_emoji's hold-out rule.
Eight instance images: each of the two ``--styles`` at full and 3/4 size, each as drawn and mirrored with
saturation/contrast jitter, on white like the training images.

Training. ``train_snapgen_lora.py --pretrained_model_name_or_path default --instance_prompt "sks emoji"
--cache_latents --cache_text_embeddings`` trains ``--steps`` steps per ``--lora-layers`` x ``--timestep-sampling``
run (a subprocess each, timed), with DreamBooth prior preservation: ``--num-class-images`` samples of the base model
for ``--class-prompt`` (default "emoji", seeds 0..N-1, made once with the training script's own
``generate_class_images``) are trained alongside the instance images at ``--prior-loss-weight``. One more run
trains the last ``--lora-layers`` set with the first ``--timestep-sampling`` mode without prior preservation
(``--no-prior-ablation`` skips it): on its own, the instance prompt pulls every prompt towards the subject. Both processes run ``--threads`` CPU threads
(default 1: on a shared 2-core machine, two threads that wait for each other made training steps 30x slower).

Measured with the pipeline's default sampler, the same seeds before and after (pixels in [0, 1]):

- "sks emoji" (``--seeds`` seeds): the mean absolute distance (and PSNR) of each sample to its nearest instance
  image, and the share of samples whose emoji-classifier top-1 (top-5) class is the subject;
- eight other prompts (``--other-seeds`` seeds each): the distance of the after-sample to the before-sample of the
  same seed, next to the distance between seeds 0 and 1 of a prompt before training (what a re-seed moves); the
  classifier top-1 (top-5) of each prompt's own concept before and after, and how many of them the classifier takes
  for the subject;
- references: the classifier on the instance images themselves, and on the bare subject name before training (the
  model's own idea of the unseen concept).

The classifier is the one ``snapgen eval`` trains and uses (``--classifier``; its classes must include the subject,
so train it on all splits of the rendered set: ``snapgen eval --data data/emoji128 --classifier runs/c.safetensors
--train-classifier``, or the emoji recipe's ``classifier`` step, which writes ``$RUNS/emoji_classifier.safetensors``).
Prompts map to classes through the eval's ``prompt_accuracy`` / ``EmojiClassifier.class_index``. ``--smoke`` trains 2
steps of one run at 64x64 with 2 seeds, 2 class images and, without ``--classifier``, an untrained classifier: it
checks the code path, not the model.

"Criterion met" for a run (the ``criterion`` entry of each run in the JSON): at least half of the "sks emoji" samples
are classified as the subject (top-1) and they are closer to the instance images than before; the other prompts'
own-concept top-1 drops by at most one sample in eight, at most one in sixteen of their samples is taken for the
subject, and their pixels move less than a re-seed moves them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SRC, markdown_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA_TOOLS = ROOT / "training_examples" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
STEM = "lora_default_model_cpu"
SUBJECT = "flamingo"
STYLES = ("noto", "twemoji")
STYLE_PACKAGES = {"noto": "noto-1.2.9", "twemoji": "twemoji-1.2.5", "fluent": "fluent-emoji-flat-1.2.6",
                  "emojione": "emojione-1.2.3", "fxemoji": "fxemoji-1.2.2"}
HOLDOUT_FRACTION = 0.05  # prepare_emoji.py's default --holdout-fraction, which the recipe uses
INSTANCE_PROMPT = "sks emoji"
OTHER_PROMPTS = ("red apple", "snowman", "blue heart", "cat face", "pizza", "rocket", "sun with face", "green apple")
SAMPLINGS = ("density", "few_step")
LAYERS = ("attn", "attn,ffn", "attn,ffn,conv")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classifier", type=Path, default=None,
                        help="the emoji classifier of `snapgen eval` (safetensors; required unless --smoke)")
    parser.add_argument("--subject", default=SUBJECT, help=f"a held-out concept of the emoji data (default {SUBJECT})")
    parser.add_argument("--styles", nargs="+", default=list(STYLES), choices=sorted(STYLE_PACKAGES),
                        help="two styles of the subject, 4 instance images each (default: noto twemoji)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="the rendered emoji set (prepare_emoji.py --output): instance images from it")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the npm packages (default: prepare_emoji's)")
    parser.add_argument("--steps", type=int, default=200, help="LoRA training steps per run (default 200)")
    parser.add_argument("--timestep-sampling", nargs="+", choices=SAMPLINGS, default=list(SAMPLINGS))
    parser.add_argument("--lora-layers", nargs="+", choices=LAYERS, default=["attn", "attn,ffn,conv"],
                        help="train_snapgen_lora.py --lora_layers values, one run each (default: attn, attn,ffn,conv)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--class-prompt", default="emoji", help="prior-preservation prompt (default: emoji)")
    parser.add_argument("--num-class-images", type=int, default=64, help="prior-preservation images (default 64)")
    parser.add_argument("--prior-loss-weight", type=float, default=1.0)
    parser.add_argument("--no-prior-ablation", action="store_true",
                        help="skip the extra run without prior preservation")
    parser.add_argument("--seeds", type=int, default=16, help="samples of the instance prompt (default 16)")
    parser.add_argument("--other-seeds", type=int, default=8, help="samples of each other prompt (default 8)")
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of sampling and training (default 1: on a shared machine more threads than "
                             "free cores make every step wait for the slowest one)")
    parser.add_argument("--smoke", action="store_true",
                        help="2 steps of one run at 64x64, 2 seeds: the code path in seconds, not a measurement")
    parser.add_argument("--work-dir", type=Path, default=None, help="instance images and adapters (default: temp)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds, args.other_seeds = min(args.steps, 2), min(args.seeds, 2), min(args.other_seeds, 2)
        args.lora_layers, args.timestep_sampling = args.lora_layers[:1], args.timestep_sampling[:1]
        args.num_class_images, args.no_prior_ablation = min(args.num_class_images, 2), True
        args.resolution = args.resolution or 64
    for flag in ("steps", "rank", "batch_size", "seeds", "threads", "num_class_images"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.other_seeds < 2:
        parser.error(f"--other-seeds must be >= 2 (seeds 0 and 1 give the scale), got {args.other_seeds}")
    if not args.learning_rate > 0:
        parser.error(f"--learning-rate must be > 0, got {args.learning_rate}")
    if not args.prior_loss_weight >= 0:
        parser.error(f"--prior-loss-weight must be >= 0, got {args.prior_loss_weight}")
    if not args.class_prompt.strip() or args.class_prompt.strip() == INSTANCE_PROMPT:
        parser.error(f"--class-prompt must be a prompt other than {INSTANCE_PROMPT!r}, got {args.class_prompt!r}")
    if args.resolution is not None and (args.resolution < 32 or args.resolution % 32):
        parser.error(f"--resolution must be a multiple of 32 (>= 32), got {args.resolution}")
    if len(args.styles) != 2 or len(set(args.styles)) != 2:
        parser.error(f"--styles takes two different styles (4 instance images each), got {args.styles}")
    if args.classifier is None and not args.smoke:
        parser.error("--classifier is required (train one with `snapgen eval --train-classifier`, see --help)")
    if args.classifier is not None and not args.classifier.is_file():
        parser.error(f"--classifier {args.classifier} does not exist")
    if args.data_dir is not None and not (args.data_dir / "train" / "metadata.jsonl").is_file():
        parser.error(f"--data-dir {args.data_dir} is not a rendered emoji set (no train/metadata.jsonl)")
    return args


# --------------------------------------------------------------------------- the subject's instance images


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]


def drawings_from_data(data_dir: Path, subject: str, styles: list[str]) -> tuple[dict, str]:
    """The subject's rendered image per style from the data set's test split; SystemExit unless it is held out."""
    from diffusers_snapgen.evaluation import concept_of

    trained = {row.get("concept") or concept_of(row["text"]) for row in _rows(data_dir / "train")}
    if subject in trained:
        raise SystemExit(f"--subject {subject!r} is a training concept of {data_dir}: pick one of the "
                         "'heldout_concept' prompts of its eval_prompts.json")
    found = {}
    for row in _rows(data_dir / "test"):
        if (row.get("concept") or concept_of(row["text"])) == subject and row.get("style") in styles:
            found.setdefault(row["style"], data_dir / "test" / row["file_name"])  # first row: the default tone
    missing = [s for s in styles if s not in found]
    if missing:
        raise SystemExit(f"--data-dir {data_dir} has no {subject!r} image in style(s) {missing}")
    drawings = {style: Image.open(found[style]).convert("RGB") for style in styles}
    return drawings, f"held-out concept of the rendered set (test split; no training caption names {subject!r})"


def drawings_from_packages(cache_dir: Path | None, subject: str, styles: list[str],
                           resolution: int = 512) -> tuple[dict, str]:
    """The subject rendered from the npm packages in ``cache_dir`` (default: prepare_emoji's cache), margin 0 like
    the training data, at ``resolution`` (resized to the model's size later); SystemExit unless the data split rule
    holds it out."""
    sys.path.insert(0, str(DATA_TOOLS))
    from emoji_render import available_renderer, render
    from emoji_sets import default_cache_dir, read_icon_set
    from prepare_emoji import is_heldout

    cache_dir = cache_dir or default_cache_dir()
    if not is_heldout(subject, HOLDOUT_FRACTION):
        raise SystemExit(f"--subject {subject!r} is a training concept (prepare_emoji.py holds out concepts by hash, "
                         f"--holdout-fraction {HOLDOUT_FRACTION}): pick a 'heldout_concept' prompt of "
                         "eval_prompts.json")
    renderer = available_renderer()
    drawings = {}
    for style in styles:
        icons = {icon.name: icon for icon in read_icon_set(cache_dir / STYLE_PACKAGES[style]).icons}
        name = subject.replace(" ", "-")
        if name not in icons:
            raise SystemExit(f"{cache_dir / STYLE_PACKAGES[style]} has no {name!r} icon")
        drawings[style] = render(icons[name], resolution, margin=0.0, renderer=renderer)
    return drawings, f"held-out concept by prepare_emoji's split rule (--holdout-fraction {HOLDOUT_FRACTION})"


def instance_variants(drawings: dict, resolution: int, folder: Path) -> list[Path]:
    """Eight images: each style's drawing at full and 3/4 size, as drawn and mirrored with colour jitter, on white."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for style, drawing in drawings.items():
        drawing = drawing.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS)
        for scale in (1.0, 0.75):
            side = round(resolution * scale)
            image = Image.new("RGB", (resolution, resolution), "white")
            image.paste(drawing.resize((side, side), Image.Resampling.LANCZOS), ((resolution - side) // 2,) * 2)
            jittered = ImageEnhance.Color(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).enhance(1.5)
            jittered = ImageEnhance.Contrast(jittered).enhance(1.15)  # the white background stays white
            for variant, picture in (("plain", image), ("jitter", jittered)):
                path = folder / f"{style}-{scale:.2f}-{variant}.png"
                picture.save(path)
                paths.append(path)
    return paths


# --------------------------------------------------------------------------- measures


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(float(((a - b) ** 2).mean()), 1e-10)))


def to_instances(images: np.ndarray, instances: np.ndarray) -> dict:
    """Mean over samples of the distance to the nearest instance image."""
    mad = np.abs(images[:, None] - instances[None]).mean(axis=(2, 3, 4))  # (samples, instances)
    nearest = mad.argmin(1)
    return {"mean_abs": float(mad.min(1).mean()),
            "psnr": float(np.mean([psnr(img, instances[j]) for img, j in zip(images, nearest)]))}


def pairwise(a: np.ndarray, b: np.ndarray) -> dict:
    return {"mean_abs": float(np.abs(a - b).mean()), "psnr": float(np.mean([psnr(x, y) for x, y in zip(a, b)]))}


def classify(classifier, images: np.ndarray, prompts: list[str], subject: str) -> dict:
    """``prompt_accuracy`` of the eval (top-1/top-5 of each prompt's concept), the share of images whose top-1 class
    is ``subject`` and the most frequent top-1 classes."""
    from diffusers_snapgen.evaluation import prompt_accuracy

    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
    accuracy = prompt_accuracy(tensor, prompts, classifier)
    top1 = [classifier.classes[i] for i in classifier.logits(tensor).argmax(1).tolist()]
    accuracy["top1_is_subject"] = sum(name == classifier.classes[classifier.class_index(subject)]
                                      for name in top1) / len(top1)
    accuracy["top1_classes"] = dict(Counter(top1).most_common(3))
    return accuracy


class Sampler:
    def __init__(self, pipe, resolution: int, seeds: int, other_seeds: int, subject: str):
        self.pipe, self.resolution, self.subject = pipe, resolution, subject
        self.seeds, self.other_seeds = list(range(seeds)), list(range(other_seeds))

    def __call__(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return as_array(self.pipe(prompts, height=self.resolution, width=self.resolution, generator=generators).images)

    def instance(self) -> np.ndarray:
        return self([INSTANCE_PROMPT] * len(self.seeds), self.seeds)

    def others(self) -> np.ndarray:
        """Prompt-major: OTHER_PROMPTS[i] with seed j at ``i * other_seeds + j``."""
        return self([p for p in OTHER_PROMPTS for _ in self.other_seeds],
                     [s for _ in OTHER_PROMPTS for s in self.other_seeds])

    def other_prompts(self) -> list[str]:
        return [p for p in OTHER_PROMPTS for _ in self.other_seeds]


def measure(sampler: Sampler, classifier, instances: np.ndarray, before: dict | None) -> tuple[dict, dict]:
    images = {"instance": sampler.instance(), "others": sampler.others()}
    subject = sampler.subject
    result = {"instance_to_nearest": to_instances(images["instance"], instances),
              "instance_classifier": classify(classifier, images["instance"], [subject] * len(sampler.seeds), subject),
              "others_classifier": classify(classifier, images["others"], sampler.other_prompts(), subject)}
    if before is not None:
        result["others_after_vs_before"] = pairwise(images["others"], before["others"])
    return result, images


def criterion(run: dict, before: dict) -> dict:
    """The docstring's criterion, each part with its numbers."""
    parts = {
        "subject_top1_at_least_half": run["instance_classifier"]["top1"] >= 0.5,
        "closer_to_instances": run["instance_to_nearest"]["mean_abs"] < before["instance_to_nearest"]["mean_abs"],
        "others_top1_drop_at_most_one_in_eight": (before["others_classifier"]["top1"]
                                                  - run["others_classifier"]["top1"]) <= 0.125 + 1e-9,
        "others_taken_for_subject_at_most_one_in_sixteen": run["others_classifier"]["top1_is_subject"] <= 0.0625,
        "others_move_less_than_a_reseed": (run["others_after_vs_before"]["mean_abs"]
                                           < before["others_seed0_vs_seed1"]["mean_abs"]),
    }
    return {**parts, "met": all(parts.values())}


# --------------------------------------------------------------------------- training


def train_lora(args, resolution: int, work: Path, out: Path, layers: str, sampling: str,
               prior: bool) -> tuple[float, str]:
    instance_dir = work / "instance"
    command = [sys.executable, str(ROOT / "training_examples" / "train_snapgen_lora.py"),
               "--pretrained_model_name_or_path", "default", "--instance_data_dir", str(instance_dir),
               "--instance_prompt", INSTANCE_PROMPT, "--resolution", str(resolution),
               "--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps),
               "--learning_rate", str(args.learning_rate), "--rank", str(args.rank), "--lora_layers", layers,
               "--timestep_sampling", sampling, "--cache_latents", "--cache_text_embeddings", "--seed", "0",
               "--report_to", "none",
               "--checkpointing_steps", str(args.steps * 10), "--output_dir", str(out)]
    if prior:
        command += ["--with_prior_preservation", "--class_data_dir", str(work / "class"), "--class_prompt",
                    args.class_prompt, "--num_class_images", str(args.num_class_images), "--prior_loss_weight",
                    str(args.prior_loss_weight)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("SNAPGEN_DEFAULT_MODEL", None)  # the embedded model, whatever the environment points at
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"train_snapgen_lora.py ({layers}, {sampling}) failed:\n{proc.stderr[-3000:]}")
    shown = [Path(c).name if c.startswith(str(ROOT)) else c.replace(str(work), "WORK")
             for c in command[1:]]  # no machine paths in the record
    shown = [f"'{c}'" if " " in c else c for c in shown]
    return wall, " ".join(shown)


# --------------------------------------------------------------------------- report


def grid(rows: list[list[np.ndarray]], cell: int) -> Image.Image:
    width = max(len(r) for r in rows)
    canvas = np.ones((len(rows) * cell, width * cell, 3), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] = image
    return Image.fromarray((canvas * 255).round().astype(np.uint8))


def load_classifier_for(args, subject: str):
    from diffusers_snapgen.evaluation import EmojiClassifier, load_classifier

    if args.classifier is None:  # --smoke: the code path on an untrained classifier
        torch.manual_seed(0)
        return EmojiClassifier(sorted({subject, *OTHER_PROMPTS}), image_size=32, widths=(8, 16)).eval()
    classifier = load_classifier(args.classifier)
    for prompt in (subject, *OTHER_PROMPTS):
        try:
            classifier.class_index(prompt)
        except ValueError as e:
            raise SystemExit(f"--classifier {args.classifier}: {e}") from None
    return classifier


def fraction(accuracy: dict, key: str = "top1") -> str:
    return f"{round(accuracy[key] * accuracy['count'])}/{accuracy['count']}"


def main(argv=None):
    from diffusers_snapgen import load_default_pipeline
    from diffusers_snapgen.training.dreambooth import generate_class_images

    args = parse_args(argv)
    if args.data_dir is not None:  # the subject's drawings first: a subject the model saw stops the run here
        drawings, heldout = drawings_from_data(args.data_dir, args.subject, args.styles)
        source = "the rendered emoji set's test split"
    else:
        drawings, heldout = drawings_from_packages(args.cache_dir, args.subject, args.styles)
        source = "the npm packages"
    torch.set_num_threads(args.threads)
    classifier = load_classifier_for(args, args.subject)
    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    resolution = args.resolution or pipe.default_sample_size * pipe.vae_scale_factor  # the model's native size
    defaults = pipe.sampling_defaults  # what a call without arguments uses: steps, guidance scale

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lora-default-"))
    instance_paths = instance_variants(drawings, resolution, work / "instance")
    instances = as_array([Image.open(p) for p in instance_paths])
    start = time.perf_counter()  # the prior-preservation images, as train_snapgen_lora.py would make them
    generate_class_images(pipe, work / "class", args.class_prompt, args.num_class_images, resolution, batch_size=8,
                          seed=0, progress=False)
    class_wall = time.perf_counter() - start

    sampler = Sampler(pipe, resolution, args.seeds, args.other_seeds, args.subject)
    start = time.perf_counter()
    before, before_images = measure(sampler, classifier, instances, None)
    sample_wall = time.perf_counter() - start
    before["others_seed0_vs_seed1"] = pairwise(before_images["others"][0::args.other_seeds],
                                               before_images["others"][1::args.other_seeds])
    subject_name = sampler([args.subject] * len(sampler.seeds), sampler.seeds)
    subject_only = [args.subject] * len(sampler.seeds)
    references = {"instance_images_classifier": classify(classifier, instances, [args.subject] * len(instances),
                                                         args.subject),
                  "subject_name_prompt_classifier": classify(classifier, subject_name, subject_only, args.subject),
                  "subject_name_prompt_to_nearest": to_instances(subject_name, instances)}
    result = {"hardware": f"CPU ({platform.machine()}, {os.cpu_count()} cores)", "smoke": args.smoke,
              "model": "embedded default model", "resolution": resolution, "sampling": defaults,
              "subject": args.subject, "subject_heldout": heldout, "styles": args.styles, "instance_source": source,
              "instance_prompt": INSTANCE_PROMPT, "other_prompts": list(OTHER_PROMPTS), "seeds": args.seeds,
              "other_seeds": args.other_seeds, "steps": args.steps, "rank": args.rank,
              "lora_layers": args.lora_layers, "timestep_sampling": args.timestep_sampling,
              "learning_rate": args.learning_rate, "batch_size": args.batch_size, "threads": args.threads,
              "prior_preservation": {"class_prompt": args.class_prompt, "num_class_images": args.num_class_images,
                                     "prior_loss_weight": args.prior_loss_weight, "generation_wall_s": class_wall},
              "classifier": args.classifier.name if args.classifier else "untrained (--smoke)",
              "classifier_classes": len(classifier.classes), "sample_wall_s": sample_wall,
              "references": references, "before": before, "runs": {}}

    columns = ["model", "train wall (s)", "sks emoji: top-1 = subject", "top-5", "sks emoji → nearest instance, "
               "mean abs", "PSNR (dB)", "other prompts: own-concept top-1", "others taken for the subject",
               "other prompts: after vs before, mean abs", "criterion met"]
    rows = [{"model": "instance images (reference: the classifier on the 8 renders)",
             columns[2]: fraction(references["instance_images_classifier"]),
             columns[3]: fraction(references["instance_images_classifier"], "top5")},
            {"model": f"default model, prompt '{args.subject}' (the unseen concept by name)",
             columns[2]: fraction(references["subject_name_prompt_classifier"]),
             columns[3]: fraction(references["subject_name_prompt_classifier"], "top5"),
             columns[4]: references["subject_name_prompt_to_nearest"]["mean_abs"],
             columns[5]: references["subject_name_prompt_to_nearest"]["psnr"]},
            {"model": "default model (no LoRA)",
             columns[2]: fraction(before["instance_classifier"]),
             columns[3]: fraction(before["instance_classifier"], "top5"),
             columns[4]: before["instance_to_nearest"]["mean_abs"], columns[5]: before["instance_to_nearest"]["psnr"],
             columns[6]: fraction(before["others_classifier"]),
             columns[7]: fraction(before["others_classifier"], "top1_is_subject"),
             columns[8]: f"{before['others_seed0_vs_seed1']['mean_abs']:.3g} (seed 0 vs seed 1)"}]
    shown = min(8, args.seeds)
    pictures = [list(instances), list(before_images["instance"][:shown]),
                list(before_images["others"][::args.other_seeds]), list(subject_name[:shown])]
    runs = [(layers, sampling, True) for layers in args.lora_layers for sampling in args.timestep_sampling]
    if not args.no_prior_ablation:
        runs.append((args.lora_layers[-1], args.timestep_sampling[0], False))
    for layers, sampling, prior in runs:
        name = f"{layers} {sampling}" + ("" if prior else " no-prior")
        out = work / (f"lora-{layers.replace(',', '-')}-{sampling}" + ("" if prior else "-no-prior"))
        wall, command = train_lora(args, resolution, work, out, layers, sampling, prior)
        pipe.load_lora_weights(str(out))
        run, after_images = measure(sampler, classifier, instances, before_images)
        pipe.unload_lora_weights()
        run = {"train_wall_s": wall, "prior_preservation": prior, "command": command, **run}
        run["criterion"] = criterion(run, before)
        result["runs"][name] = run
        label = f"prior '{args.class_prompt}'" if prior else "**no** prior preservation"
        rows.append({"model": f"+ LoRA on {layers}, --timestep_sampling {sampling}, {label}",
                     columns[1]: f"{wall:.0f}",
                     columns[2]: fraction(run["instance_classifier"]),
                     columns[3]: fraction(run["instance_classifier"], "top5"),
                     columns[4]: run["instance_to_nearest"]["mean_abs"], columns[5]: run["instance_to_nearest"]["psnr"],
                     columns[6]: fraction(run["others_classifier"]),
                     columns[7]: fraction(run["others_classifier"], "top1_is_subject"),
                     columns[8]: run["others_after_vs_before"]["mean_abs"],
                     columns[9]: "yes" if run["criterion"]["met"] else "no"})
        pictures += [list(after_images["instance"][:shown]), list(after_images["others"][::args.other_seeds])]
    result["criterion_met_by"] = [name for name, run in result["runs"].items() if run["criterion"]["met"]]

    title = (f"LoRA on the embedded default model: {args.steps} steps on 8 images of a subject it never saw "
             f"({args.subject}, {' + '.join(args.styles)}; rank {args.rank}, learning rate {args.learning_rate:g}, "
             f"batch {args.batch_size}; DreamBooth prior preservation with {args.num_class_images} base-model "
             f"samples of '{args.class_prompt}'), {result['hardware']}, {args.threads} thread(s); sampled at "
             f"{resolution}x{resolution} with the model's defaults ({defaults['num_inference_steps']} steps, CFG "
             f"{defaults['guidance_scale']:g}); 'sks emoji' over seeds 0-{args.seeds - 1}, the {len(OTHER_PROMPTS)} "
             f"other prompts over seeds 0-{args.other_seeds - 1} each; pixels in [0, 1]"
             + (" — SMOKE RUN (untrained classifier, 2 steps): not a measurement" if args.smoke else ""))
    table = title + "\n\n" + markdown_table(rows, columns)
    table += ("\n\nClassifier columns: the emoji classifier of `snapgen eval` (concept classes, "
              f"{len(classifier.classes)} of them); 'top-1 = subject' counts 'sks emoji' samples whose most likely "
              f"class is {args.subject!r}; 'own-concept top-1' counts other-prompt samples classified as their own "
              f"prompt, 'taken for the subject' those classified as {args.subject!r}. Criterion (the script's "
              "docstring): subject top-1 in at least half the samples and closer to the instances; other prompts' "
              "top-1 down by at most one in eight, at most one in sixteen taken for the subject, and moved less than "
              "a re-seed moves them. Met by: " + (", ".join(result["criterion_met_by"]) or "none") + ". Wall "
              f"times: class images {class_wall:.0f} s (once), one round of samples {sample_wall:.0f} s.")
    table += (f"\n\nRows of {STEM}.jpg: the instance images; before: 'sks emoji' (seeds 0-{shown - 1}), the other "
              f"prompts (seed 0) and the prompt '{args.subject}' (seeds 0-{shown - 1}); then, per run in table "
              "order, 'sks emoji' and the other prompts after training.")
    write_results(args.out, STEM, result, table)
    tmp = args.out / f".tmp-{STEM}.jpg"
    grid(pictures, resolution).save(tmp, format="JPEG", quality=85)
    tmp.replace(args.out / f"{STEM}.jpg")
    print(table)


if __name__ == "__main__":
    main()
