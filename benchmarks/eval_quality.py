"""Quality table of the embedded emoji models: ``snapgen eval`` with ``--out benchmarks/results`` by default.

    python benchmarks/eval_quality.py --data data/emoji --classifier runs/emoji_classifier.safetensors \\
        --models teacher=runs/teacher:28 nokd=runs/nokd:28 kd=runs/kd:28 kd4=runs/kd:4 asd4=runs/asd:4 \\
        --base runs/base --encoder runs/vae --images-per-prompt 4

On one GPU (docs/emoji_evaluation.md): add ``--device cuda --size 128 --max-prompts 100 --batch-size 256
--autocast bf16``.

Writes ``eval_quality.json``, ``eval_quality.md``, ``eval_quality_grid.png`` and ``eval_quality_seeds.png``. Every
option is ``snapgen eval``'s (see ``--help``); the measuring code is ``diffusers_snapgen.evaluation``.
"""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    from diffusers_snapgen.cli import main as snapgen_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out" not in argv and not any(a.startswith("--out=") for a in argv) and "--models" in argv:
        argv += ["--out", str(RESULTS)]
    return snapgen_main(["eval", *argv])


if __name__ == "__main__":
    sys.exit(main())
