"""The design steps of paper Fig. 2 / Fig. 3 as ``SnapGenUNet2DModel`` configs.

Each variant applies one more step to the previous one; (f) is the default configuration. The relative changes
the paper reports (§3.1, Fig. 3) sit beside each step so ``benchmarks/ablation_table.py`` can print both.
"""

from __future__ import annotations

from collections import OrderedDict

# (a) SDXL's UNet made thinner and shorter: (256, 512, 896) channels, (0, 2, 4) transformer blocks.
_BASELINE = dict(
    conv_type="regular",
    transformer_layers_per_block=(0, 2, 4),
    only_cross_attention=False,
    ff_mult=4,
    kv_heads=None,
    qk_norm=None,
    use_rope=False,
)

# Step name, config change over the previous variant, and the paper's reported change vs the previous variant
# (fractions; None where the paper gives no number for that metric).
_STEPS = [
    ("a", "thin/short SDXL UNet (baseline)", {}, {}),
    (
        "b",
        "self-attention only in the lowest-resolution stage",
        {"only_cross_attention": (True, True, False)},
        {"flops": -0.17, "latency": -0.24},
    ),
    (
        "c",
        "separable convs with x2 expansion (UIB)",
        {"conv_type": "separable", "conv_expansion_ratio": 2},
        {"params": -0.15, "flops": -0.27},
    ),
    ("d", "FFN expansion 4 -> 3", {"ff_mult": 3}, {"params": -0.12, "flops": -0.12}),
    (
        "e1",
        "multi-query attention (one shared K/V head)",
        {"kv_heads": 1},
        {"params": -0.16, "flops": -0.06, "latency": -0.09},
    ),
    # The paper *replaces* stage-1 residual blocks with CA+FFN transformer blocks ("smaller, faster", no number).
    # The concrete config (docs/design.md, "UNet"; public derivative configs) keeps the residual blocks and adds one
    # transformer block per layer, which adds ~1.5% params and ~13% FLOPs at a 128x128 latent.
    (
        "e",
        "conditions from the first stage (CA+FFN transformer blocks in stage 1)",
        {"transformer_layers_per_block": (1, 2, 4)},
        {},
    ),
    (
        "f",
        "RMSNorm QK-norm + 2D RoPE (final)",
        {"qk_norm": "rms_norm", "use_rope": True},
        {"params": 0.0, "flops": 0.0},
    ),
]


def ablation_variants() -> "OrderedDict[str, dict]":
    """Variants ``a``-``f`` of paper Fig. 2 (``e1`` is (e)'s multi-query half alone): ``{key: {"description", "config", "paper_change"}}``.

    ``config`` holds keyword arguments for ``SnapGenUNet2DModel`` (all other arguments keep the paper defaults);
    ``paper_change`` holds the paper's relative change of params / FLOPs / latency against the previous variant.
    """
    variants: "OrderedDict[str, dict]" = OrderedDict()
    config = dict(_BASELINE)
    for key, description, change, paper_change in _STEPS:
        config = {**config, **change}
        variants[key] = {"description": description, "config": dict(config), "paper_change": dict(paper_change)}
    return variants
