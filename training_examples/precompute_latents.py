#!/usr/bin/env python
# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
"""Precompute VAE latents and text embeddings of a training set once, in parallel, as safetensors shards + an
index (docs/distributed_training.md); train on them with ``--precompute_dir`` (the device caches of
``--cache_latents --cache_text_embeddings``, no data loader, no encoders in the loop).

    accelerate launch --config_file training_examples/configs/ddp.yaml --num_processes 8 \
      training_examples/precompute_latents.py \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-large \
      --train_shards "data/{00000..00999}.tar" --resolution 1024 --random_flip --center_crop \
      --mixed_precision bf16 --output_dir precomputed-1024

    accelerate launch training_examples/train_snapgen_kd.py --precompute_dir precomputed-1024 \
      --resolution 1024 --random_flip --center_crop ...

Process ``p`` of ``N`` encodes shards ``p, p + N, ...``; an interrupted run continues where it stopped. The data
flags are the training scripts' (``--dataset_name [--streaming]``, ``--train_data_dir``, ``--train_shards``,
``--resolution``, ``--center_crop``, ``--random_flip``, ``--max_sequence_length``), and training checks that they match.
"""

from diffusers_snapgen.training import parse_or_exit
from diffusers_snapgen.training.precompute import parse_precompute_args, run_precompute

if __name__ == "__main__":
    run_precompute(parse_or_exit(parse_precompute_args))
