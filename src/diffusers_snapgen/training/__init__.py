"""Reusable SnapGen training pieces (paper §3.2-3.4; docs/design.md), used by ``training_examples/``.

The engine (one loop for every script; docs/training_speed.md):

- :mod:`.engine` - setup, the loop (accumulate -> backward -> clip -> step -> EMA -> log -> checkpoint -> validate),
  resume; :class:`TrainingTask` is what a script varies.
- :mod:`.step` - one optimizer step, eager or captured in a CUDA graph; device-side random numbers.
- :mod:`.batches`, :mod:`.metrics` - on-device data and metrics (no host sync in the step).
- :mod:`.tasks` - flow matching, KD, ASD, tiny decoder, autoencoder, tiny encoder.
- :mod:`.args`, :mod:`.task_args` - the scripts' command lines, composed from argument groups.
- :mod:`.distributed`, :mod:`.streaming`, :mod:`.precompute` - several processes (DDP, FSDP2, DeepSpeed; a sharded
  teacher), streamed tar shards / Hub datasets, sharded precomputed latents (docs/distributed_training.md).

The objectives and their pieces:

- :mod:`.flow_matching` - rectified-flow objective on diffusers' timestep densities and loss weightings.
- :mod:`.kd` - multi-level knowledge distillation: output KD, hooked feature KD with learned projectors.
- :mod:`.scaling` - timestep-aware scaling of task and KD losses; per-timestep-bucket loss statistics.
- :mod:`.asd` - adversarial step distillation (paper §3.4): few-step grid sampler, teacher rollout, the objective.
- :mod:`.discriminator`, :mod:`.adversarial` - teacher-feature and patch discriminators; hinge, non-saturating, R1.
- :mod:`.reconstruction` - tiny-decoder pieces (paper §3.2): patches, PSNR/SSIM, losses, evaluation.
- :mod:`.autoencoder` - the 16-channel, f = 8 ``AutoencoderKL`` of the demo model: KL, latent statistics.
- :mod:`.lora`, :mod:`.dreambooth` - LoRA adapters (diffusers' LoRA layout, few-step timestep sampling) and
  DreamBooth data with prior preservation (``train_snapgen_lora.py``).
- :mod:`.data`, :mod:`.checkpointing`, :mod:`.components` - data and caches, atomic checkpoints, model loading.
"""

from .adversarial import GAN_LOSSES, discriminator_loss, generator_loss, r1_penalty, set_requires_grad
from .args import build_parser, parse_args, parse_or_exit, validate_args
from .autoencoder import kl_divergence, latent_statistics
from .asd import AdversarialStepDistillation, FewStepSampler, TeacherTargets, few_step_sigmas, teacher_rollout
from .checkpointing import (
    TrainingState,
    atomic_save_pipeline,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    register_checkpoint_hooks,
    remove_incomplete,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from .components import (
    build_pipeline,
    check_teacher_student,
    encode_captions,
    encode_latents,
    load_base_components,
    load_student,
    load_teacher,
    load_vae_encoder,
    scale_latents,
    text_widths,
    weight_dtype_for,
)
from .data import (
    EpochShuffleSampler,
    ImageCaptionDataset,
    LatentCache,
    TextEmbeddingCache,
    build_train_dataloader,
    collate_examples,
    load_image_caption_dataset,
    preprocess_image,
)
from .reconstruction import DecoderLosses, ImagePatchDataset, evaluate_decoder, psnr, ssim
from .discriminator import DiscriminatorHead, PatchDiscriminator, TeacherFeatureDiscriminator
from .flow_matching import (
    WEIGHTING_SCHEMES,
    FlowMatchingBatch,
    FlowMatchingSampler,
    add_flow_noise,
    denoiser_forward,
    flow_matching_loss,
    flow_matching_target,
    prepare_flow_matching_batch,
    step_generator,
)
from .kd import (
    FeatureCapture,
    FeatureProjector,
    KDLayerPair,
    MultiLevelKD,
    PROJECTOR_DIRECTIONS,
    default_sd3_snapgen_layer_pairs,
    feature_kd_from_args,
    output_kd_loss,
    parse_layer_pairs,
    select_feature,
    tokens_to_map,
)
from .batches import DeviceImageCache, DeviceIndexBatches, LoaderBatches
from .engine import (
    StepOutput,
    TrainingRun,
    TrainingTask,
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    finish,
    prepare_run,
    setup_accelerator,
    train,
)
from .loop import TrainContext, batch_conditioning, flow_matching_task_loss, student_flow_matching_step
from .metrics import StepMetrics
from .scaling import ALPHA_SCHEDULES, AlphaSchedule, TimestepAwareScaling, TimestepBucketStats
from .step import StepProgram, StepRandom, step_seed
from .tasks import (
    ASDTask,
    AutoencoderTask,
    FlowMatchingTask,
    KDTask,
    LoRATask,
    TinyDecoderTask,
    TinyEncoderTask,
    load_denoiser_base,
    train_autoencoder,
    train_tiny_decoder,
    train_tiny_encoder,
)

__all__ = [name for name in dir() if not name.startswith("_")]
