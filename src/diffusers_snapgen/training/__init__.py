"""Reusable SnapGen training pieces (paper §3.3; DESIGN.md §4), used by ``training_examples/``.

- :mod:`.flow_matching` - rectified-flow objective on diffusers' timestep densities and loss weightings.
- :mod:`.kd` - multi-level knowledge distillation: output KD, hooked feature KD with learned projectors.
- :mod:`.scaling` - timestep-aware scaling of task and KD losses; per-timestep-bucket loss statistics.
- :mod:`.data` - HF datasets / imagefolder loading, deterministic augmentation, latent and text caches.
- :mod:`.checkpointing` - atomic, resumable accelerate checkpoints; atomic pipeline saving.
- :mod:`.components` - loading encoders, VAE, student and teacher.
- :mod:`.args` - the scripts' command line.
- :mod:`.loop` - the shared training loop.
- :mod:`.asd` - adversarial step distillation (paper §3.4): few-step grid sampler, teacher rollout, the objective.
- :mod:`.discriminator`, :mod:`.adversarial` - teacher-feature and patch discriminators; hinge, non-saturating, R1.
- :mod:`.decoder_training`, :mod:`.decoder_loop` - tiny-decoder training (paper §3.2): patches, metrics, losses, loop.
- :mod:`.autoencoder_training` - the 16-channel, f = 8 ``AutoencoderKL`` of the demo model: KL, latent statistics.
"""

from .adversarial import GAN_LOSSES, discriminator_loss, generator_loss, r1_penalty, set_requires_grad
from .args import build_parser, parse_args, validate_args
from .autoencoder_training import latent_statistics, train_autoencoder
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
from .decoder_loop import train_tiny_decoder
from .decoder_training import DecoderLosses, ImagePatchDataset, evaluate_decoder, psnr, ssim
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
from .loop import TrainContext, batch_conditioning, flow_matching_task_loss, student_flow_matching_step
from .scaling import ALPHA_SCHEDULES, AlphaSchedule, TimestepAwareScaling, TimestepBucketStats

__all__ = [name for name in dir() if not name.startswith("_")]
