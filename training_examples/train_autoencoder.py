#!/usr/bin/env python
# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
"""Train a diffusers AutoencoderKL with SnapGen's latent layout: 16 channels, f = 8 (recipe step `vae` of
training_examples/recipes/emoji_demo.sh; SnapGen, Hu et al., CVPR 2025, arXiv 2412.09619, uses SD3's VAE).

    accelerate launch training_examples/train_autoencoder.py \
      --train_data_dir data/emoji --vae_config runs/emoji/configs/vae.json \
      --resolution 256 --random_flip --cache_images --train_batch_size 32 --learning_rate 1e-4 \
      --reconstruction_loss l1 --kl_weight 1e-6 --lpips_weight 0 --use_ema \
      --max_train_steps 20000 --checkpointing_steps 2000 --resume_from_checkpoint latest --output_dir runs/emoji/vae

Loss: L1 (or MSE) reconstruction + --kl_weight x KL + optional LPIPS (--lpips_weight; needs the `lpips` package and
its backbone weights from the web, otherwise one warning and training goes on without it) + optional patch GAN
(--gan_weight from --gan_start_step). PSNR/SSIM on the held-out images (--validation_data_dir, default
<train_data_dir>/test) before training, every --validation_steps and at the end go to <output_dir>/eval_results.json.
At the end the training images are encoded and scaling_factor = 1 / std(z), shift_factor = mean(z) are written into
the config (SD3 convention: (z - shift_factor) * scaling_factor). The output folder is a diffusers AutoencoderKL:

    vae = AutoencoderKL.from_pretrained("runs/emoji/vae")
"""

from diffusers_snapgen.training import parse_or_exit
from diffusers_snapgen.training.task_args import parse_autoencoder_args
from diffusers_snapgen.training.tasks import train_autoencoder


def main(argv=None):
    return train_autoencoder(parse_or_exit(parse_autoencoder_args, argv))


if __name__ == "__main__":
    main()
