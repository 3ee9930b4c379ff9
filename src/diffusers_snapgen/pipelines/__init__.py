"""SnapGen pipelines (paper §3): text-to-image with the SnapGen UNet, FlowMatchEulerDiscreteScheduler and a decoder."""

from .fast_sampling import SnapGenFastSampler
from .pipeline_snapgen import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    SAMPLING_DEFAULTS_KEY,
    SnapGenPipeline,
    SnapGenPipelineOutput,
    snapgen_scheduler,
)

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_NUM_INFERENCE_STEPS",
    "SAMPLING_DEFAULTS_KEY",
    "SnapGenFastSampler",
    "SnapGenPipeline",
    "SnapGenPipelineOutput",
    "snapgen_scheduler",
]
