"""LoRA / DreamBooth fine-tuning of a SnapGen UNet (``train_snapgen_lora.py``): flow matching of a peft LoRA adapter
on the frozen UNet (:mod:`..lora`), on caption data or DreamBooth instance (+ class) images (:mod:`..dreambooth`).

The result is ``<output_dir>/pytorch_lora_weights.safetensors`` in diffusers' LoRA layout, loadable with
``SnapGenPipeline.load_lora_weights(output_dir)``, and a model card ``README.md``; checkpoints hold the same file (the
engine's checkpoint hooks save and load only the adapter of a peft-adapted model).
"""

from __future__ import annotations

import logging

import torch

from ..components import build_pipeline
from ..distributed import is_deepspeed, is_fsdp
from ..dreambooth import dreambooth_dataset, generate_class_images
from ..engine import StepOutput
from ..flow_matching import flow_matching_loss
from ..hub import push_to_hub, write_model_card
from ..lora import add_lora_adapter, save_lora_adapter, timestep_sampler
from .denoising import DenoiserBase, FlowMatchingTask

logger = logging.getLogger("diffusers_snapgen.training")

__all__ = ["LoRATask", "prepare_class_images", "add_lora_from_args"]


def prepare_class_images(args, accelerator, base: DenoiserBase, unet) -> int:
    """With ``--with_prior_preservation``: the main process fills ``--class_data_dir`` up to ``--num_class_images``
    with samples of ``--class_prompt`` from the base pipeline (``unet`` before the adapter is added); the others wait.
    Returns the number of images generated here."""
    if not getattr(args, "with_prior_preservation", False):
        return 0
    written = 0
    if accelerator.is_main_process:
        pipe = build_pipeline(base.components, unet)
        device = accelerator.device
        moved = [m for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, unet)
                 if isinstance(m, torch.nn.Module)]
        for module in moved:
            module.to(device)
        with accelerator.autocast():
            written = generate_class_images(pipe, args.class_data_dir, args.class_prompt, args.num_class_images,
                                            args.resolution, args.sample_batch_size, args.seed,
                                            progress=accelerator.is_local_main_process)
        del pipe
    accelerator.wait_for_everyone()
    return written


def add_lora_from_args(args, unet, weight_dtype=None):
    """:func:`~..lora.add_lora_adapter` with ``--rank``, ``--lora_alpha``, ``--lora_dropout``, ``--lora_layers``."""
    return add_lora_adapter(unet, rank=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            layers=args.lora_layers, weight_dtype=weight_dtype)


class LoRATask(FlowMatchingTask):
    """Flow matching of the LoRA adapter of ``unet`` (already added: :func:`add_lora_from_args`); the base weights
    stay frozen. ``--timestep_sampling few_step`` trains only on the sigmas the pipeline visits (a few-step model
    stays few-step); DreamBooth samples carry a loss weight (prior preservation)."""

    name = "lora"

    def __init__(self, args, accelerator, base: DenoiserBase, unet: torch.nn.Module):
        if is_fsdp(accelerator) or is_deepspeed(accelerator):
            raise ValueError("train_snapgen_lora.py trains a small adapter and runs with DDP (one or several "
                             "processes), not FSDP or DeepSpeed: launch it with training_examples/configs/ddp.yaml.")
        super().__init__(args, accelerator, base, unet, card_kind="lora")
        self.sampler = timestep_sampler(args.timestep_sampling, self.pipeline.scheduler, args.weighting_scheme,
                                        args.logit_mean, args.logit_std, args.mode_scale, args.num_inference_steps)
        self.sample_weights: torch.Tensor | None = None
        grid = getattr(self.sampler, "grid", None)
        if grid is not None:
            logger.info("timestep sampling: few_step, the %d sigmas of the pipeline's %d-step schedule %s", len(grid),
                        self.sampler.num_inference_steps, [round(float(s), 4) for s in grid])

    def load_dataset(self):
        args = self.args
        if args.instance_data_dir is None:
            return super().load_dataset()
        class_dir = args.class_data_dir if args.with_prior_preservation else None
        hf, weights = dreambooth_dataset(args.instance_data_dir, args.instance_prompt, class_dir, args.class_prompt,
                                         args.prior_loss_weight, args.image_column, args.caption_column,
                                         args.num_class_images)
        self.sample_weights = weights.to(self.accelerator.device)
        logger.info("DreamBooth data: %d samples (%s)", len(hf),
                    "instance and class images, 1:1" if class_dir else "instance images")
        return hf

    def compute_loss(self, batch, generator) -> StepOutput:
        fm, pred, _, _ = self.student_step(batch, generator)
        task = flow_matching_loss(pred, fm.target, fm.sigmas, self.args.weighting_scheme)
        if self.sample_weights is None:
            return StepOutput(task.mean(), per_sample={"task": task}, timesteps=fm.sigmas)
        weights = self.sample_weights[batch["index"].to(self.sample_weights.device)]
        return StepOutput((weights * task).mean(), per_sample={"task": task}, timesteps=fm.sigmas)

    def save_final(self, model):
        """``pytorch_lora_weights.safetensors`` and ``README.md`` (the model card) in ``--output_dir``; final
        validation images; ``--push_to_hub`` uploads the folder."""
        args = self.args
        self.save_model(model, args.output_dir)
        images = self.validate(self.run.state.global_step, final=True)
        if args.instance_data_dir is not None:
            data = f"DreamBooth: instance prompt `{args.instance_prompt}`" + (
                f", prior preservation with `{args.class_prompt}` (weight {args.prior_loss_weight})"
                if args.with_prior_preservation else "")
        else:
            data = f"Trained on `{args.dataset_name or 'a local image folder'}`"
        notes = f"{data}; {len(images or [])} validation prompt(s) were sampled at the end."
        prompt = args.instance_prompt or (args.validation_prompts or [None])[0]
        write = push_to_hub if args.push_to_hub else write_model_card
        write(args, "lora", "lora", self.card_rows(), source=args.pretrained_model_name_or_path, notes=notes,
              prompt=prompt)

    def save_model(self, model, output_dir):
        """The adapter alone, as at the end."""
        logger.info("saved the LoRA adapter to %s", save_lora_adapter(model, output_dir))

    def card_rows(self) -> dict:
        args = self.args
        rows = {k: v for k, v in super().card_rows().items() if k != "EMA"}
        rows.update({"LoRA rank": args.rank, "LoRA alpha": args.lora_alpha or args.rank,
                     "LoRA layers": args.lora_layers, "timestep sampling": args.timestep_sampling})
        return rows
