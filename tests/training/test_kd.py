"""Multi-level KD pieces: hooks, token maps, projectors, losses (src/diffusers_snapgen/training/kd.py)."""

import pytest
import torch
import torch.nn.functional as F

from diffusers_snapgen.training import (
    FeatureCapture,
    FeatureProjector,
    KDLayerPair,
    MultiLevelKD,
    default_sd3_snapgen_layer_pairs,
    denoiser_forward,
    output_kd_loss,
    parse_layer_pairs,
    select_feature,
    tokens_to_map,
)
from diffusers_snapgen.training.kd import bilinear_resize, probe_inputs


def test_tokens_to_map_is_row_major_and_checks_the_grid():
    fmap = torch.randn(2, 5, 3, 4)
    tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C), the order SD3's patch embedding produces
    assert torch.equal(tokens_to_map(tokens, (3, 4)), fmap)
    assert tokens_to_map(torch.randn(1, 16, 2), None).shape == (1, 2, 4, 4)
    with pytest.raises(ValueError, match="grid"):
        tokens_to_map(tokens, (4, 4))
    with pytest.raises(ValueError, match="square"):
        tokens_to_map(torch.randn(1, 12, 2), None)


def test_select_feature_picks_image_stream_of_joint_blocks():
    enc, img = torch.randn(1, 3, 8), torch.randn(1, 16, 8)
    assert select_feature((enc, img)) is img  # SD3 JointTransformerBlock: (encoder_hidden_states, hidden_states)
    assert select_feature((None, img), 1) is img  # last block (context_pre_only)
    fmap = torch.randn(1, 4, 2, 2)
    assert select_feature((fmap, (fmap,))) is fmap  # diffusers down blocks: (hidden_states, res_samples)
    with pytest.raises(ValueError, match="index"):
        select_feature((None, img), 0)
    with pytest.raises(TypeError):
        select_feature("x")


def test_capture_folds_teacher_tokens_onto_the_patch_grid(tiny_models):
    _, teacher = tiny_models
    names = ["transformer_blocks.0", "transformer_blocks.3"]
    cap = FeatureCapture(teacher, names, [1, 1], detach=True)
    lat, ts, ehs, pooled = probe_inputs(teacher, batch_size=2, latent_size=8)
    with cap, torch.no_grad():
        out = denoiser_forward(teacher, lat, ts, ehs, pooled)
        feats = {n: cap[n] for n in names}
    assert all(f.shape == (2, 32, 4, 4) for f in feats.values())  # inner dim 32, 8x8 latent / patch 2
    # the hooks are gone after the context: a new forward captures nothing
    with torch.no_grad():
        denoiser_forward(teacher, lat, ts, ehs, pooled)
    assert cap.features == {} and out.shape == lat.shape
    # non-square latents keep their grid
    cap2 = FeatureCapture(teacher, names[:1], [1])
    with cap2, torch.no_grad():
        denoiser_forward(teacher, torch.randn(1, 4, 8, 12), ts[:1], ehs[:1], pooled[:1])
        assert cap2[names[0]].shape == (1, 32, 4, 6)
    with pytest.raises(ValueError, match="no submodule"):
        FeatureCapture(teacher, ["transformer_blocks.99"])


def test_first_call_wins_under_gradient_checkpointing():
    from diffusers_snapgen.testing import tiny_unet

    unet = tiny_unet().train()
    lat, ts, ehs, pooled = probe_inputs(unet, batch_size=2, latent_size=8)
    cap = FeatureCapture(unet, ["mid_block", "up_blocks.1.attentions.0"])
    results = []
    for ckpt in (False, True):
        unet.zero_grad()
        if ckpt:
            unet.enable_gradient_checkpointing()
        with cap:
            out = denoiser_forward(unet, lat, ts, ehs, pooled)
            feat = cap["mid_block"]
            loss = out.square().mean() + feat.square().mean()
            loss.backward()  # recomputation re-enters the hooked modules; the captured tensor must not change
            assert cap["mid_block"] is feat
        results.append((feat.detach(), [p.grad.clone() for p in unet.parameters() if p.grad is not None]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 8), (2, 2), (3, 5)])
def test_linear_projector_resize_order_does_not_matter(shape):
    torch.manual_seed(0)
    proj = FeatureProjector(6, 3)
    x = torch.randn(2, 6, 4, 4)
    out = proj(x, shape)
    assert out.shape == (2, 3, *shape)
    mode = dict(mode="area") if shape[0] <= 4 and shape[1] <= 4 else dict(mode="bilinear", align_corners=False)
    other = F.interpolate(proj.proj(x), size=shape, **mode)
    assert torch.allclose(out, other, atol=1e-5)
    assert FeatureProjector(6, 3, "mlp")(x, shape).shape == (2, 3, *shape)
    with pytest.raises(ValueError, match="kind"):
        FeatureProjector(6, 3, "conv3")


@pytest.mark.parametrize("shape,size", [((4, 4), (8, 8)), ((3, 5), (7, 6)), ((1, 2), (4, 4)), ((4, 4), (4, 9))])
def test_bilinear_resize_matches_interpolate(shape, size):
    x = torch.randn(3, 5, *shape, dtype=torch.float64, requires_grad=True)
    ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    out = bilinear_resize(x, size)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-6)
    grad = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    (g_out,) = torch.autograd.grad(out, x, grad)
    assert torch.allclose(g_out, g_ref, atol=1e-6)


def test_output_kd_loss():
    s = torch.randn(3, 4, 2, 2, requires_grad=True)
    t = torch.randn(3, 4, 2, 2, requires_grad=True)
    loss = output_kd_loss(s, t)
    assert loss.shape == (3,) and torch.allclose(loss, ((s - t) ** 2).mean(dim=(1, 2, 3)))
    loss.sum().backward()
    assert t.grad is None and s.grad is not None  # the teacher is a target only
    assert output_kd_loss(s, s.detach()).abs().max() == 0
    with pytest.raises(ValueError, match="latent space"):
        output_kd_loss(s, t[:, :2])


def test_layer_pair_parsing():
    pairs = parse_layer_pairs("mid_block=transformer_blocks.19:1, up_blocks.0.attentions.1=transformer_blocks.28")
    assert pairs == [KDLayerPair("mid_block", "transformer_blocks.19", teacher_index=1),
                     KDLayerPair("up_blocks.0.attentions.1", "transformer_blocks.28")]
    js = parse_layer_pairs('[{"student": "mid_block", "teacher": "transformer_blocks.2", "weight": 2.0}]')
    assert js[0].weight == 2.0
    assert parse_layer_pairs([("a", "b")]) == [KDLayerPair("a", "b")]
    for bad in ("mid_block", "", "a=b:x"):
        with pytest.raises(ValueError):
            parse_layer_pairs(bad)
    with pytest.raises(ValueError, match="weight"):
        KDLayerPair("a", "b", weight=-1)


def test_default_pairs_for_paper_student_and_sd35_large():
    from diffusers_snapgen import SnapGenUNet2DModel

    with torch.device("meta"):
        student = SnapGenUNet2DModel()
    pairs = default_sd3_snapgen_layer_pairs(38, student)
    assert [p.teacher for p in pairs] == [f"transformer_blocks.{i}" for i in (9, 18, 28, 35)]
    assert [p.student for p in pairs] == [
        "down_blocks.2.attentions.1", "mid_block", "up_blocks.0.attentions.2", "up_blocks.1.attentions.2"
    ]
    for p in pairs:
        student.get_submodule(p.student)
    with pytest.raises(ValueError, match="teacher_num_layers"):
        default_sd3_snapgen_layer_pairs(0, student)


def assert_feature_loss_trains_student_only(kd, student, teacher, inputs):
    """One forward of both models with gradients on the student: the feature loss reaches the student, never the
    teacher."""
    kd.clear()
    denoiser_forward(student, *inputs)
    with torch.no_grad():
        denoiser_forward(teacher, *inputs)
    kd().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_student_to_teacher_projectors_regress_onto_the_fixed_teacher_feature(tiny_models):
    """FitNets direction: projectors map student channels onto the teacher's, and the target is the teacher feature
    itself, so zeroing the projector cannot drive the loss to zero (it can with teacher_to_student)."""
    _, teacher = tiny_models
    from diffusers_snapgen.testing import tiny_unet

    student = tiny_unet().train()
    pairs = default_sd3_snapgen_layer_pairs(teacher.config.num_layers, student)
    kd = MultiLevelKD.from_models(student, teacher, pairs, projector_direction="student_to_teacher")
    assert [p.proj.in_channels for p in kd.projectors] == [48, 48, 48, 32]
    assert [p.proj.out_channels for p in kd.projectors] == [32] * 4
    kd.attach(student, teacher)
    lat, ts, ehs, pooled = probe_inputs(student, batch_size=2, latent_size=8)
    with torch.no_grad():
        for proj in kd.projectors:
            proj.proj.weight.zero_()
            proj.proj.bias.zero_()
    kd.clear()
    denoiser_forward(student, lat, ts, ehs, pooled)
    with torch.no_grad():
        denoiser_forward(teacher, lat, ts, ehs, pooled)
    per_pair = kd.pair_losses()
    for pair, loss in zip(kd.pairs, per_pair):  # a zero projection leaves exactly the teacher feature's energy
        t = kd.teacher_capture[pair.teacher].float()
        torch.testing.assert_close(loss, (t**2).reshape(2, -1).mean(dim=1))
        assert (loss > 0).all()
    with torch.no_grad():
        for proj in kd.projectors:
            torch.nn.init.normal_(proj.proj.weight, std=0.1)
    assert_feature_loss_trains_student_only(kd, student, teacher, (lat, ts, ehs, pooled))
    kd.detach_hooks()

    teacher_side = MultiLevelKD.from_models(student, teacher, pairs)  # the default direction, for contrast
    with torch.no_grad():
        for proj in teacher_side.projectors:
            proj.proj.weight.zero_()
            proj.proj.bias.zero_()
    teacher_side.attach(student, teacher)
    teacher_side.clear()
    with torch.no_grad():
        denoiser_forward(student, lat, ts, ehs, pooled)
        denoiser_forward(teacher, lat, ts, ehs, pooled)
    for pair, loss in zip(teacher_side.pairs, teacher_side.pair_losses()):
        s = teacher_side.student_capture[pair.student].float()  # the target is the (zero) projection:
        torch.testing.assert_close(loss, (s**2).reshape(2, -1).mean(dim=1))  # the student can shrink to meet it
    teacher_side.detach_hooks()
    with pytest.raises(ValueError, match="projector_direction"):
        MultiLevelKD(pairs, [32] * 4, [48, 48, 48, 32], projector_direction="sideways")


def test_multilevel_kd_trains_projectors_and_student_not_teacher(tiny_models):
    unet, teacher = tiny_models
    from diffusers_snapgen.testing import tiny_unet

    student = tiny_unet().train()
    pairs = default_sd3_snapgen_layer_pairs(teacher.config.num_layers, student)
    kd = MultiLevelKD.from_models(student, teacher, pairs)
    # channels were probed: teacher inner dim 32 -> student widths (48 at the lowest resolution, 32 at stage 2)
    assert [p.proj.in_channels for p in kd.projectors] == [32] * 4
    assert [p.proj.out_channels for p in kd.projectors] == [48, 48, 48, 32]
    kd.attach(student, teacher)
    lat, ts, ehs, pooled = probe_inputs(student, batch_size=2, latent_size=8)
    opt = torch.optim.Adam(list(kd.parameters()), lr=3e-2)
    losses = []
    for _ in range(15):  # learning the projectors alone drives the feature loss down
        kd.clear()
        with torch.no_grad():
            denoiser_forward(student, lat, ts, ehs, pooled)
            denoiser_forward(teacher, lat, ts, ehs, pooled)
        loss = kd()
        assert loss.shape == (2,)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        losses.append(loss.mean().item())
    assert losses[-1] < 0.5 * losses[0]
    # with gradients on, the student gets them too; the teacher never does
    assert_feature_loss_trains_student_only(kd, student, teacher, (lat, ts, ehs, pooled))
    assert "projectors.0.proj.weight" in kd.state_dict() and not any(k.startswith("student") for k in kd.state_dict())
    kd.detach_hooks()
    with pytest.raises(RuntimeError, match="attach"):
        kd()
