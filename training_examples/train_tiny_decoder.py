#!/usr/bin/env python
# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
"""Train SnapGen's tiny decoder against a frozen AutoencoderKL encoder (Hu et al., CVPR 2025, arXiv 2412.09619, §3.2).

    accelerate launch training_examples/train_tiny_decoder.py \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-large \
      --train_data_dir ./photos --validation_data_dir ./held_out_photos \
      --resolution 256 --train_batch_size 64 --mixed_precision bf16 --learning_rate 1e-4 \
      --lpips_weight 1.0 --gan_weight 0.1 --use_ema --max_train_steps 1000000 \
      --checkpointing_steps 5000 --validation_steps 5000 --output_dir snapgen-tiny-decoder

Latents come from the frozen encoder of any ``AutoencoderKL`` (SD3's 16-channel one in real use; ``vae`` subfolder of
a pipeline, or a bare model). The ``TinyDecoder`` (paper configuration unless ``--decoder_config``) learns on random
``--resolution``² patches with MSE + LPIPS (``--lpips_weight``; needs the ``lpips`` package and its backbone weights
from the web - when they are missing a warning is logged and training goes on with MSE + GAN) + a patch-GAN hinge
loss. No KL term: the encoder is fixed. PSNR and SSIM on held-out images are logged every ``--validation_steps``
and written to ``<output_dir>/eval_results.json``; the decoder is saved in diffusers format in ``--output_dir``:

    decoder = TinyDecoder.from_pretrained("snapgen-tiny-decoder")
    pipe = SnapGenPipeline.from_pretrained(..., vae=decoder)  # or StableDiffusion3Pipeline(..., vae=decoder)
"""

from diffusers_snapgen.training import parse_or_exit
from diffusers_snapgen.training.task_args import parse_decoder_args
from diffusers_snapgen.training.tasks import train_tiny_decoder

if __name__ == "__main__":
    train_tiny_decoder(parse_or_exit(parse_decoder_args))
