"""CPU cost of the embedded default model: the README's main command and the pipeline call behind it.

    python benchmarks/bench_default_model.py                 # writes benchmarks/results/bench_default_model_cpu.*

Rows, measured in one run on this machine's CPU (float32):

- ``snapgen generate`` end to end in a fresh process (imports, MiniLM and model loading, sampling, PNG), the README's
  main command, median of ``--cli-runs``;
- one warm ``pipe(prompt)`` at the shipped defaults (steps and CFG from its scheduler config, TinyDecoder), median
  of ``--iters``;
- the anchor: the same UNet sampled like a non-distilled model (28 steps, CFG 3), which is what the 4-step ASD model
  saves. Image size is the model's native one unless ``--size`` is given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, markdown_table, time_ms, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", default="red apple")
    parser.add_argument("--size", type=_positive, default=None, help="image side (default: the model's native size)")
    parser.add_argument("--iters", type=_positive, default=5, help="timed warm pipeline calls (default 5)")
    parser.add_argument("--cli-runs", type=_positive, default=3, help="timed `snapgen generate` runs (default 3)")
    parser.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    return parser.parse_args(argv)


def time_cli(prompt: str, size: int, runs: int) -> float:
    """Median seconds of ``snapgen generate PROMPT -o apple.png`` in a fresh interpreter."""
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "diffusers_snapgen", "generate", prompt, "-o", str(Path(tmp, "apple.png")),
                   "--height", str(size), "--width", str(size)]
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None) -> int:
    from diffusers_snapgen import load_default_pipeline

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    pipe = load_default_pipeline()
    native = pipe.default_sample_size * pipe.vae_scale_factor
    size = args.size or native
    defaults = pipe.sampling_defaults

    def call(steps, guidance):
        return lambda: pipe(args.prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                            generator=torch.Generator().manual_seed(0))

    rows = [
        {"run": "snapgen generate (fresh process)", "steps": defaults["num_inference_steps"],
         "seconds": time_cli(args.prompt, size, args.cli_runs)},
        {"run": "pipe(prompt), warm", "steps": defaults["num_inference_steps"],
         "seconds": time_ms(call(defaults["num_inference_steps"], defaults["guidance_scale"]), device, 1,
                            args.iters) / 1e3},
        {"run": "anchor: same UNet, 28 steps, CFG 3", "steps": 28,
         "seconds": time_ms(call(28, 3.0), device, 1, args.iters) / 1e3},
    ]
    rows[2]["vs warm 4-step"] = f"{rows[2]['seconds'] / rows[1]['seconds']:.1f}x"
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    title = (f"Default model on {device_name(device)}, {torch.get_num_threads()} torch threads, float32, {size}x{size}, "
             f"prompt {args.prompt!r}")
    table = f"{title}\n\n" + markdown_table(rows, ["run", "steps", "seconds", "vs warm 4-step"])
    payload = {"device": device_name(device), "threads": torch.get_num_threads(), "size": size,
               "prompt": args.prompt, "parameters": params, "torch": torch.__version__, "rows": rows}
    write_results(args.out, "bench_default_model_cpu", payload, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
