#!/usr/bin/env python
# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
"""Train a TinyEncoder for SnapGen's latent space by distilling a frozen AutoencoderKL's encoder (the counterpart of
the tiny decoder, Hu et al., CVPR 2025, arXiv 2412.09619, §3.2), so that a pipeline shipped with only the tiny decoder
can be fine-tuned (docs/finetuning.md).

    accelerate launch training_examples/train_tiny_encoder.py \
      --pretrained_model_name_or_path runs/emoji/vae \
      --train_data_dir data/emoji --validation_data_dir data/emoji/test \
      --resolution 64 --random_flip --cache_images --train_batch_size 64 --learning_rate 1e-3 \
      --use_ema --max_train_steps 5000 --checkpointing_steps 1000 --validation_steps 1000 \
      --mixed_precision bf16 --compile --cuda_graphs --output_dir runs/emoji/tiny_encoder

Loss: MSE between the TinyEncoder's latent and the AutoencoderKL's posterior mean, in scaled latent units
((z - shift_factor) * scaling_factor: 1.0 is about the latents' variance), plus --pixel_loss_weight x MSE between the
image and the autoencoder's decoding of the tiny latent (off by default). Held-out latent MSE and PSNR/SSIM of the
decoded tiny latents are logged before training, every --validation_steps and at the end, and written to
<output_dir>/eval_results.json (with the autoencoder's own PSNR, the ceiling). The output folder is a diffusers model
whose config carries the autoencoder's scaling_factor / shift_factor; copy it into a pipeline as `vae_encoder/`:

    encoder = TinyEncoder.from_pretrained("runs/emoji/tiny_encoder")
    z = encoder.encode(images).latent_dist.mode()  # zero variance: mean == mode == sample

A pipeline with a decoder only (e.g. `default`, the embedded model) has no autoencoder to distil: --targets
pipeline_samples inverts its frozen decoder on latents the pipeline samples from the training captions (MSE of
E(D(z)) vs z, plus --pixel_loss_weight x MSE(D(E(x)), x) on the real images; docs/finetuning.md):

    python training_examples/train_tiny_encoder.py --targets pipeline_samples \
      --pretrained_model_name_or_path default --train_data_dir data/emoji64/train \
      --validation_data_dir data/emoji64/test --resolution 64 --num_pipeline_samples 2048 \
      --pixel_loss_weight 2 --pixel_batch_size 4 --max_train_steps 800 --output_dir runs/default-encoder
"""

from diffusers_snapgen.training import parse_or_exit
from diffusers_snapgen.training.task_args import parse_encoder_args
from diffusers_snapgen.training.tasks import train_tiny_encoder


def main(argv=None):
    return train_tiny_encoder(parse_or_exit(parse_encoder_args, argv))


if __name__ == "__main__":
    main()
