#!/usr/bin/env python
# Copyright 2025 The diffusers-snapgen authors. Apache-2.0.
"""LoRA / DreamBooth fine-tuning of a SnapGen UNet (Hu et al., CVPR 2025, arXiv 2412.09619), the SnapGen analogue of
diffusers' ``train_dreambooth_lora_sd3.py`` and ``train_text_to_image_lora.py``.

DreamBooth (a subject from a few images, with prior preservation):

    accelerate launch training_examples/train_snapgen_lora.py \
      --pretrained_model_name_or_path path/to/snapgen-pipeline \
      --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \
      --with_prior_preservation --class_data_dir ./dog-class --class_prompt "a photo of a dog" \
      --resolution 1024 --train_batch_size 2 --learning_rate 1e-4 --max_train_steps 400 \
      --rank 8 --timestep_sampling few_step --mixed_precision bf16 \
      --validation_prompt "a photo of sks dog on the beach" --output_dir snapgen-lora-dog

Captioned data (``--train_data_dir`` with a metadata.jsonl, or ``--dataset_name``) works as in ``train_snapgen.py``.

Only the adapter trains: a peft ``LoraConfig`` (``--rank``, ``--lora_alpha``, ``--lora_dropout``) on the layers of
``--lora_layers`` (attention projections by default; ``attn,ffn`` adds the feed-forwards, ``conv`` the ResNet
convolutions), added with ``unet.add_adapter``; the frozen UNet, text encoders and VAE run in ``--mixed_precision``.
Loss: flow matching, ``mean((v(x_t, t, c) - (eps - x0))^2)``, weighted per sample with prior preservation.

Timesteps. ``--timestep_sampling density`` (default) draws sigmas from the logit-normal flow-matching density, right
for a many-step model. A few-step model (the 4-step ASD model shipped as the default, paper §3.4) is only ever
sampled at its own few sigmas, and flow matching at other noise levels pulls it back towards a many-step velocity
field (its 4-step images blur): use ``--timestep_sampling few_step``, which draws only the sigmas the pipeline visits
with its default number of steps (``--num_inference_steps`` to override), so the model stays few-step.

Output: ``<output_dir>/pytorch_lora_weights.safetensors`` (diffusers' LoRA layout) and a model card README.md:

    pipe = SnapGenPipeline.from_pretrained("path/to/snapgen-pipeline")
    pipe.load_lora_weights("snapgen-lora-dog")

or ``snapgen generate "a photo of sks dog" --model path/to/snapgen-pipeline --lora snapgen-lora-dog``. Checkpoints
hold the same file (and resume exactly); ``--push_to_hub`` uploads the folder. See training_examples/README.md.
"""

import logging

from diffusers_snapgen.training import finish, load_student, parse_or_exit, prepare_run, setup_accelerator, train
from diffusers_snapgen.training.lora import lora_parameters
from diffusers_snapgen.training.lora_args import parse_lora_args
from diffusers_snapgen.training.tasks import LoRATask, add_lora_from_args, load_denoiser_base, prepare_class_images

logger = logging.getLogger(__name__)


def main(args):
    accelerator = setup_accelerator(args)
    # Frozen text encoders, VAE and scheduler of the pipeline being fine-tuned.
    base = load_denoiser_base(args, accelerator)
    unet = load_student(args.pretrained_model_name_or_path, args.unet_model_name_or_path,
                        revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)

    # DreamBooth prior preservation: class images from the base model, before the adapter exists.
    prepare_class_images(args, accelerator, base, unet)

    # The frozen UNet (in the weight dtype) with a float32 LoRA adapter: only the adapter trains.
    add_lora_from_args(args, unet, weight_dtype=base.weight_dtype)
    task = LoRATask(args, accelerator, base, unet)
    batches, dataloader = task.build_data()

    run = prepare_run(args, accelerator, task, unet, [{"params": lora_parameters(unet)}], batches,
                      dataloader=dataloader)
    train(run)
    finish(run)  # pytorch_lora_weights.safetensors + README.md in --output_dir


if __name__ == "__main__":
    main(parse_or_exit(parse_lora_args))
