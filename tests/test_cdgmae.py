"""CDG-MAE pre-training (Sec. 3.3, 4, A.3.1): each test states one property of the paper."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import cdgmae
from cdgmae import CDGMAE, VisionTransformer, vit_base, vit_small

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, decoder_ffn_dim=64)
TINY_CLI = ["--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--decoder-dim", "32",
            "--decoder-depth", "1", "--decoder-heads", "2", "--decoder-ffn-dim", "64",
            "--patch-size", "8", "--input-size", "32", "--workers", "0", "--log-every", "1"]


def record_masks(model):
    """Wrap model.forward_masked to record (mask_ratio, tokens, mask) of every encoder call."""
    calls, original = [], model.forward_masked

    def wrapped(x, mask_ratio, noise=None):
        tokens, mask, ids_restore = original(x, mask_ratio, noise)
        calls.append((mask_ratio, tokens, mask))
        return tokens, mask, ids_restore
    model.forward_masked = wrapped
    return calls


# --- Masking (Eq. 4-6) -------------------------------------------------------

@pytest.mark.parametrize("anchor_mask_ratio, visible", [(0.0, 196), (0.25, 147), (0.5, 98)])
def test_target_keeps_19_patches_and_each_anchor_int_196_times_one_minus_ra(anchor_mask_ratio, visible):
    model = CDGMAE(num_anchors=3, anchor_mask_ratio=anchor_mask_ratio, **TINY)
    calls = record_masks(model)
    _, _, mask = model(torch.randn(2, 3, 224, 224), torch.randn(2, 3, 3, 224, 224))
    (_, target_tokens, target_mask), (_, anchor_tokens, anchor_mask) = calls
    assert (mask == target_mask).all()
    assert (1 - target_mask).sum(1).tolist() == [19, 19]          # int(196 * 0.1) = 19, not 20
    assert target_tokens.shape[1] == 1 + 19                       # cls + visible patches
    assert anchor_mask.shape == (6, 196)                          # B * N anchors, each its own mask
    assert (1 - anchor_mask).sum(1).tolist() == [visible] * 6
    assert anchor_tokens.shape[1] == 1 + visible


def test_anchor_masks_are_independent():
    model = CDGMAE(num_anchors=3, anchor_mask_ratio=0.5, **TINY)
    calls = record_masks(model)
    model(torch.randn(4, 3, 224, 224), torch.randn(4, 3, 3, 224, 224))
    anchor_masks = calls[1][2]
    # 12 masks of 98 out of 196: any two equal by chance with probability ~1e-58.
    distinct = {tuple(m.tolist()) for m in anchor_masks}
    assert len(distinct) == 12
    # Independence, not just difference: two anchors' masks overlap about half as much as
    # they could (98 * 98 / 196 = 49 patches masked in both, on average).
    overlaps = [(anchor_masks[i] * anchor_masks[j]).sum().item() for i in range(12) for j in range(i + 1, 12)]
    assert 40 < np.mean(overlaps) < 58


@pytest.mark.float_kernels
def test_unmasked_anchor_keeps_every_patch_in_image_order():
    vit = VisionTransformer(**{k: TINY[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")})
    x = torch.randn(2, 3, 224, 224)
    tokens, mask, _ = vit.forward_masked(x, 0.0)
    assert mask.sum() == 0
    assert torch.equal(tokens, vit(x))  # the same operations on the same tensors: equal to the bit


# --- Loss (Eq. 10) and cross-attention (Eq. 9) -------------------------------

@pytest.mark.float_kernels
def test_loss_is_the_mse_over_masked_patches_of_normalised_pixels():
    torch.manual_seed(0)
    model = CDGMAE(num_anchors=1, **TINY)
    target = torch.randn(2, 3, 224, 224)
    pred = torch.randn(2, 196, 768)
    mask = torch.zeros(2, 196)
    mask[:, ::3] = 1
    # Brute force in numpy: patch (i, j) holds pixels [c, 16i:16i+16, 16j:16j+16], ordered (row, col, channel).
    t = target.double().numpy()
    expected = []
    for b in range(2):
        for idx in range(196):
            if mask[b, idx] == 0:
                continue
            i, j = divmod(idx, 14)
            patch = t[b, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16].transpose(1, 2, 0).reshape(-1)
            patch = (patch - patch.mean()) / np.sqrt(patch.var(ddof=1) + 1e-6)
            expected.append(((pred[b, idx].double().numpy() - patch) ** 2).mean())
    # float32 inside: sums of K positive terms round by <= K eps relative, K = 768 (a patch's variance) plus
    # 131 (the masked patches): <= 6e-5; a biased variance (ddof 0) would be off by 6.5e-4
    assert model.forward_loss(target, pred, mask).item() == pytest.approx(np.mean(expected), rel=1e-4)


def test_loss_ignores_predictions_on_visible_patches():
    model = CDGMAE(num_anchors=1, **TINY)
    target, pred = torch.randn(2, 3, 224, 224), torch.randn(2, 196, 768)
    mask = (torch.rand(2, 196) < 0.9).float()
    loss = model.forward_loss(target, pred, mask)
    changed_visible = pred + 5.0 * (1 - mask).unsqueeze(-1)
    changed_masked = pred + 5.0 * mask.unsqueeze(-1)
    assert model.forward_loss(target, changed_visible, mask) == loss
    assert model.forward_loss(target, changed_masked, mask) != loss


@pytest.mark.float_kernels
def test_reconstruction_reads_the_anchors_through_cross_attention():
    torch.manual_seed(0)  # float64: the anchors' order changes the order of the attention's sums
    model = CDGMAE(num_anchors=2, anchor_mask_ratio=0.25, **TINY).eval().double()
    target, anchors = torch.randn(1, 3, 224, 224).double(), torch.randn(1, 2, 3, 224, 224).double()
    noise_t, noise_a = torch.rand(1, 196), torch.rand(1, 2, 196)
    _, pred, mask = model(target, anchors, noise_t, noise_a)
    _, pred_same, _ = model(target, anchors, noise_t, noise_a)
    _, pred_other, _ = model(target, torch.randn(1, 2, 3, 224, 224).double(), noise_t, noise_a)
    # Eq. (7) concatenates the anchors as one unordered memory: their order does not matter.
    _, pred_swapped, _ = model(target, anchors.flip(1), noise_t, noise_a.flip(1))
    masked = mask[0].bool()
    assert torch.equal(pred, pred_same)
    assert (pred[0, masked] - pred_other[0, masked]).abs().max() > 1e-2  # other anchors move it by ~0.1
    # float64 sums of K <= 300 terms (memory tokens, widths) of size <= 10 in another order: <= K eps max|term|
    # = 3e-13 a layer, through 3 blocks far below 1e-9; |pred| ~ 1
    assert torch.allclose(pred, pred_swapped, rtol=0, atol=1e-9)


def test_patch_size_8_runs_with_784_patches():
    model = CDGMAE(num_anchors=2, anchor_mask_ratio=0.25, **{**TINY, "patch_size": 8})
    calls = record_masks(model)
    loss, pred, mask = model(torch.randn(1, 3, 224, 224), torch.randn(1, 2, 3, 224, 224))
    assert pred.shape == (1, 784, 8 * 8 * 3) and mask.shape == (1, 784)
    assert (1 - mask).sum().item() == int(784 * 0.1)
    assert (1 - calls[1][2]).sum(1).tolist() == [int(784 * 0.75)] * 2
    assert torch.isfinite(loss)


# --- Table 8: GFLOPs of one 224x224 training sample --------------------------

TABLE_8 = [(1, 0.0, 6.0), (2, 0.0, 10.4), (2, 0.25, 8.3), (2, 0.5, 6.1),
           (3, 0.25, 11.6), (3, 0.5, 8.3), (4, 0.25, 14.9), (4, 0.5, 10.6)]


@pytest.mark.parametrize("anchors, anchor_mask, gflops", TABLE_8)
def test_flop_counter_reproduces_table_8(anchors, anchor_mask, gflops):
    counts = cdgmae.main(["--count-flops", "--anchors", str(anchors), "--anchor-mask", str(anchor_mask)])
    assert abs(counts["fvcore"] / 1e9 - gflops) < 0.05  # the paper's one-decimal rounding


def test_flop_counter_matches_a_count_by_hand():
    """ViT-S/16 + 4-block decoder of width 256, N = 3, r_a = 0.25, multiply-adds counted by hand."""
    D, Dd, L = 384, 256, 196
    enc_token = 12 * (D * 3 * D + D * D + 2 * D * 4 * D)      # qkv, proj, fc1, fc2 per block
    patch_embed = L * (3 * 16 * 16) * D
    t_tokens, a_tokens, n = 1 + 19, 1 + 147, 3
    encoder = (1 + n) * patch_embed + (t_tokens + n * a_tokens) * enc_token
    dec_target = 4 * (197 * (Dd * Dd + Dd * Dd)            # cross-attn q and output proj
                      + 197 * 2 * Dd * 2048                # FFN
                      + 197 * (3 * Dd * Dd + Dd * Dd))     # self-attn qkv and proj
    dec_memory = n * a_tokens * (D * Dd + 4 * 2 * Dd * Dd)  # decoder_embed + k,v of 4 blocks
    decoder = t_tokens * D * Dd + dec_target + dec_memory + 197 * Dd * 768
    layernorm = 5 * ((t_tokens + n * a_tokens) * D * 25 + 197 * Dd * 13)
    counts = cdgmae.count_flops(CDGMAE(num_anchors=3, anchor_mask_ratio=0.25))
    assert counts["linear"] + counts["conv"] == encoder + decoder
    assert counts["layernorm"] == layernorm


# --- Checkpoints: MAE / DINO / CropMAE layouts --------------------------------

def official_vit_state(dim, depth, patch, grid, with_decoder=False):
    """A state dict with the official MAE/DINO key names and shapes, random values."""
    g = torch.Generator().manual_seed(0)
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                       b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                       b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                       b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
    if with_decoder:  # MAE's visualisation checkpoint / CropMAE: decoder keys ride along
        shapes.update({"mask_token": (1, 1, 512), "decoder_embed.weight": (512, dim),
                       "decoder_embed.bias": (512,), "decoder_pos_embed": (1, 1 + grid * grid, 512),
                       "decoder_blocks.0.self_attn.in_proj_weight": (1536, 512),
                       "decoder_norm.weight": (512,), "decoder_pred.weight": (patch * patch * 3, 512)})
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


def test_official_mae_vit_b16_checkpoint_loads_strictly(tmp_path):
    state = official_vit_state(768, 12, 16, 14, with_decoder=True)
    torch.save({"model": state, "epoch": 1599}, tmp_path / "mae_visualize_vit_base.pth")
    encoder = cdgmae.encoder_from_checkpoint(tmp_path / "mae_visualize_vit_base.pth")
    assert (encoder.embed_dim, encoder.depth, encoder.num_heads, encoder.patch_size) == (768, 12, 12, 16)
    loaded = encoder.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith(("decoder", "mask_token"))}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_dino_teacher_and_plain_backbones_load_strictly(tmp_path):
    state = official_vit_state(384, 12, 8, 28)  # DINO ViT-S/8
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    teacher["head.mlp.0.weight"] = torch.zeros(2048, 384)
    for name, ckpt in [("plain", state), ("teacher", {"teacher": teacher, "epoch": 100})]:
        encoder = vit_small(patch_size=8)
        cdgmae.load_encoder_state(encoder, cdgmae.unwrap_state_dict(ckpt))
        assert torch.equal(encoder.pos_embed, state["pos_embed"]), name
        assert torch.equal(encoder.blocks[11].mlp.fc2.weight, state["blocks.11.mlp.fc2.weight"]), name


def test_mismatched_checkpoint_is_an_error_that_lists_the_keys():
    state = official_vit_state(384, 12, 16, 14)
    del state["norm.weight"]
    state["fc_extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing keys: \['norm.weight'\][\s\S]*unexpected keys: \['fc_extra.weight'\]"):
        cdgmae.load_encoder_state(vit_small(), state)
    state = official_vit_state(384, 12, 16, 14)
    with pytest.raises(ValueError, match="attn.qkv.weight: checkpoint"):
        cdgmae.load_encoder_state(vit_base(), {k: v for k, v in state.items()})


@pytest.mark.float_kernels
def test_interpolated_position_embedding_is_the_identity_at_the_original_size():
    pos = torch.randn(1, 1 + 14 * 14, 16)
    assert torch.equal(cdgmae.interpolate_pos_embed(pos, 14, 14), pos)
    # Resized to another grid, the cls slot is untouched and a constant field stays constant.
    const = torch.cat([pos[:, :1], torch.full((1, 196, 16), 0.3)], dim=1)
    out = cdgmae.interpolate_pos_embed(const, 30, 55)
    assert out.shape == (1, 1 + 30 * 55, 16)
    assert torch.equal(out[:, :1], pos[:, :1])
    # float32 inside: 4 x 4 taps whose weights sum to 1 (sum |w| <= 1.4 ** 2), each weight, product and sum
    # rounded (under 10 eps in all): |out - 0.3| <= 0.3 * 2 * 10 eps ~ 4e-7
    assert torch.allclose(out[:, 1:], torch.full_like(out[:, 1:], 0.3), rtol=0, atol=1e-5)


def cubic_weight(d, a=-0.75):
    d = abs(d)
    if d <= 1:
        return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    if d < 2:
        return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
    return 0.0


@pytest.mark.float_kernels
def test_position_embedding_is_resampled_at_dinos_scale_factor_positions():
    # bicubic (a = -0.75, edges clamped) sampled at source = (dst + 0.5) * g0 / (g + 0.1) - 0.5
    g0, gh, gw, dim = 4, 5, 7, 3
    pos = torch.randn(1, 1 + g0 * g0, dim, dtype=torch.float64)
    grid = pos[0, 1:].reshape(g0, g0, dim).numpy()

    def taps(dst, g):
        src = (dst + 0.5) * g0 / (g + 0.1) - 0.5
        base = math.floor(src)
        return [(min(max(k, 0), g0 - 1), cubic_weight(src - k)) for k in range(base - 1, base + 3)]

    expected = np.zeros((gh, gw, dim))
    for i in range(gh):
        for j in range(gw):
            for yi, wy in taps(i, gh):
                for xj, wx in taps(j, gw):
                    expected[i, j] += wy * wx * grid[yi, xj]
    got = cdgmae.interpolate_pos_embed(pos, gh, gw)
    assert torch.equal(got[0, 0], pos[0, 0])  # the cls slot is kept
    # float32 inside: 4 x 4 taps, sum |w| <= 1.4 ** 2, each value, weight, product and sum rounded (under
    # 10 eps in all): <= 2 * 10 eps * max|value| ~ 1.2e-6 * max|value|, and 48 normal draws stay below 5
    assert np.allclose(got[0, 1:].reshape(gh, gw, dim).numpy(), expected, rtol=0, atol=1e-5)
    assert torch.equal(cdgmae.interpolate_pos_embed(pos, g0, g0), pos)  # unchanged at the stored grid


def test_encoder_runs_on_480x880_video_frames():
    vit = VisionTransformer(**{k: TINY[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")})
    assert vit(torch.randn(1, 3, 480, 880)).shape == (1, 1 + 30 * 55, 32)


@pytest.mark.float_kernels
def test_fixed_sincos_embedding_matches_the_formula():
    emb = cdgmae.sincos_pos_embed(8, 3, 4)  # D/4 = 2 frequencies: omega = 1, 1/100
    row, col = 2, 3
    v = emb[1 + row * 4 + col]
    expected = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100),
                math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
    assert torch.allclose(v, torch.tensor(expected), rtol=0, atol=1e-6)  # |values| <= 1, float32: a few eps
    assert torch.equal(emb[0], torch.zeros(8))


# --- Data: bags of views -----------------------------------------------------

def write_bags(root, num_bags=12, views=3, size=(40, 48), broken=None):
    rng = np.random.default_rng(0)
    for i in range(num_bags):
        bag = root / f"class{i % 2}" / f"img{i:03d}"
        bag.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(bag / "real.jpg")
        for k in range(views):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(bag / f"view_{k:02d}.jpg")
    return root


def test_one_crop_and_flip_are_shared_by_all_views(tmp_path):
    bag = tmp_path / "bags" / "a"
    bag.mkdir(parents=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    for name in ["real.png", "view_00.png", "view_01.png", "view_02.png"]:
        img.save(bag / name)
    ds = cdgmae.BagDataset(tmp_path / "bags", ["a"], 3, num_anchors=3, input_size=32, num_patches=16)
    for epoch in range(5):
        target, anchors, _, _ = ds[(epoch, 0)]
        assert all(torch.equal(target, a) for a in anchors)


@pytest.mark.parametrize("choice, allowed", [("real", {0}), ("generated", {1, 2, 3, 4}), ("any", {0, 1, 2, 3, 4})])
def test_target_choice_and_anchors_drawn_from_the_rest_of_the_bag(tmp_path, choice, allowed):
    bag = tmp_path / "a"
    bag.mkdir()
    for k, name in enumerate(["real.png", "view_00.png", "view_01.png", "view_02.png", "view_03.png"]):
        Image.new("RGB", (16, 16), (40 * k, 0, 0)).save(bag / name)
    ds = cdgmae.BagDataset(tmp_path, ["a"], 4, num_anchors=2, input_size=16, target_choice=choice, num_patches=4)
    seen = set()
    for epoch in range(60):
        target, anchors, _, _ = ds[(epoch, 0)]
        ids = [round(x[0].float().mean().item() / 40) for x in [target, *anchors]]  # uint8 crops
        assert ids[0] in allowed and len(set(ids)) == 3  # target and 2 distinct anchors, none repeated
        seen.add(ids[0])
    assert seen == allowed


def test_incomplete_or_unreadable_bags_fail_at_start_up_naming_them(tmp_path):
    root = write_bags(tmp_path / "bags")
    (root / "class0" / "img002" / "view_01.jpg").unlink()
    (root / "class1" / "img003" / "view_02.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as err:
        cdgmae.main(["--data", str(root), "--output", str(tmp_path / "run"), "--batch-size", "4", *TINY_CLI])
    message = str(err.value)
    assert "2 of 12 bags" in message
    assert "img002: incomplete" in message
    assert "img003: view_02.jpg: cannot decode image" in message


def test_a_bag_with_fewer_than_n_plus_1_views_is_an_error(tmp_path):
    root = write_bags(tmp_path / "bags", views=2)
    with pytest.raises(SystemExit, match="needs at least 4"):
        cdgmae.main(["--data", str(root), "--output", str(tmp_path / "run"), "--batch-size", "4",
                     "--anchors", "3", *TINY_CLI])


# --- Optimisation (Table 6) --------------------------------------------------

def test_learning_rate_schedule_warmup_then_cosine():
    args = cdgmae.get_args_parser().parse_args(["--data", "x"])
    args.lr = args.blr * args.batch_size / 256
    assert args.lr == pytest.approx(1.2e-3)  # 1.5e-4 * 2048 / 256
    assert cdgmae.learning_rate(0.0, args.lr, args.min_lr, args.warmup_epochs, args.epochs) == 0.0
    assert cdgmae.learning_rate(2.5, args.lr, args.min_lr, args.warmup_epochs, args.epochs) == pytest.approx(args.lr / 2)
    assert cdgmae.learning_rate(5.0, args.lr, args.min_lr, args.warmup_epochs, args.epochs) == pytest.approx(args.lr)
    assert cdgmae.learning_rate(52.5, args.lr, args.min_lr, args.warmup_epochs, args.epochs) == pytest.approx(args.lr / 2)
    assert cdgmae.learning_rate(100.0, args.lr, args.min_lr, args.warmup_epochs, args.epochs) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_follows_timms_rule_as_mae_and_cropmae():
    """timm's rule (MAE, CropMAE): no decay exactly for biases and 1-D parameters; the [1, 1, D]
    cls and mask tokens are decayed."""
    model = CDGMAE(**TINY)
    decay, no_decay = cdgmae.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_no_decay = {n for n in trainable if n.endswith(".bias") or dict(model.named_parameters())[n].ndim == 1}
    assert {names[id(p)] for p in no_decay["params"]} == expected_no_decay
    assert {names[id(p)] for p in decay["params"]} == trainable - expected_no_decay
    assert {"cls_token", "mask_token"} <= {names[id(p)] for p in decay["params"]}
    assert {"norm.bias", "norm.weight", "blocks.0.attn.qkv.bias", "decoder_pred.bias"} <= expected_no_decay
    # The fixed sin-cos position embeddings are not trained at all.
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


# --- Training runs: resume and DDP -------------------------------------------

def final_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    return ckpt["model"], ckpt


def test_stopping_and_resuming_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    root = write_bags(tmp_path / "bags")  # 12 bags, global batch 4: 3 steps per epoch
    common = ["--data", str(root), "--batch-size", "4", "--epochs", "3", "--warmup-epochs", "1",
              "--anchors", "2", "--anchor-mask", "0.25", "--vis-every", "1", *TINY_CLI]
    cdgmae.main([*common, "--output", str(tmp_path / "straight"), "--max-steps", "5"])
    cdgmae.main([*common, "--output", str(tmp_path / "stopped"), "--max-steps", "2"])
    stopped, ckpt = final_state(tmp_path / "stopped")
    assert (ckpt["next_epoch"], ckpt["next_step"]) == (0, 2)
    cdgmae.main([*common, "--output", str(tmp_path / "stopped"), "--max-steps", "5", "--resume", "auto"])
    straight, _ = final_state(tmp_path / "straight")
    resumed, ckpt = final_state(tmp_path / "stopped")
    assert (ckpt["next_epoch"], ckpt["next_step"]) == (1, 2)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not all(torch.equal(straight[k], stopped[k]) for k in straight)  # training did move them
    assert (tmp_path / "straight" / "reconstruction-0001.png").exists()
    log = (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    assert len(log) == 5


@pytest.mark.float_kernels
def test_torchrun_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    root = write_bags(tmp_path / "bags", num_bags=16)
    common = ["--data", str(root), "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "0.5",
              "--max-steps", "3", "--anchors", "2", "--anchor-mask", "0.5",
              # Dropout masks are drawn per rank, so they differ between 1 and 2 processes.
              "--decoder-dropout", "0", *TINY_CLI]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "cdgmae.py"), *common, "--output", str(tmp_path / "ddp")],
                   check=True, env=env, cwd=tmp_path, capture_output=True, timeout=300)
    cdgmae.main([*common, "--output", str(tmp_path / "single")])
    ddp, _ = final_state(tmp_path / "ddp")
    single, _ = final_state(tmp_path / "single")
    initial, ddp_initial = (torch.load(tmp_path / run / "checkpoint-0000.pth", weights_only=True)["model"]
                            for run in ("single", "ddp"))
    assert all(torch.equal(initial[k], ddp_initial[k]) for k in initial)  # one starting point
    moved = torch.cat([(single[k] - initial[k]).flatten() for k in single])
    apart = torch.cat([(ddp[k] - single[k]).flatten() for k in single])
    # The runs sum the global batch in another order, so their gradients differ by rounding. AdamW moves a
    # parameter by lr * m / sqrt(v) a step, |m / sqrt(v)| <= 1.001 over 3 steps at betas (0.9, 0.95): about
    # lr * sign(g). Rounding changes that only for a component whose gradient is within rounding of zero, by
    # at most 2 * sum(lr); the 40k components move by about 170 * sum(lr) in norm, so 5% of it holds 18 such
    # components. Ranks that did not average their gradients would disagree in sign on a large share.
    assert moved.norm() > 0 and apart.norm() <= 0.05 * moved.norm()


def test_checkpoints_hold_only_plain_tensors_and_args(tmp_path):
    root = write_bags(tmp_path / "bags")
    cdgmae.main(["--data", str(root), "--output", str(tmp_path / "run"), "--batch-size", "4",
                 "--epochs", "1", *TINY_CLI])
    _, ckpt = final_state(tmp_path / "run")  # weights_only=True refuses pickled objects
    assert ckpt["args"]["anchors"] == 1 and ckpt["args"]["num_heads"] == 2
    encoder = cdgmae.encoder_from_checkpoint(tmp_path / "run" / "checkpoint-0001.pth", img_size=32)
    assert (encoder.embed_dim, encoder.depth, encoder.num_heads, encoder.patch_size) == (32, 1, 2, 8)


def test_temporaries_are_unique_per_process_and_only_dead_writers_are_swept(tmp_path):
    import socket
    import subprocess
    import sys
    mine = common.temporary_path(tmp_path / "checkpoint-last.pth")
    assert mine.name == f".checkpoint-last.pth.{socket.gethostname()}-{os.getpid()}.tmp"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    for name in (mine.name, f".view_00.jpg.{host}-{dead}.tmp", f".view_01.jpg.otherhost-{dead}.tmp"):
        (tmp_path / name).write_bytes(b"partial")
    assert common.remove_stale_temporaries(tmp_path) == 1  # only this host's dead writer
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, f".view_01.jpg.otherhost-{dead}.tmp"])


def test_checked_flag_types_hold_values_to_their_range():
    import argparse
    topk = common.checked(int, 1)
    ratio = common.checked(float, 0, 1, high_open=True)
    assert (topk("7"), ratio("0"), ratio("0.25")) == (7, 0.0, 0.25)
    for parse, text in [(topk, "0"), (topk, "-3"), (topk, "2.5"), (ratio, "1"), (ratio, "-0.1"),
                        (ratio, "nan"), (ratio, "inf"), (ratio, "x")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_the_initial_checkpoint_holds_the_weights_before_the_first_step(tmp_path):
    root = write_bags(tmp_path / "bags")
    cdgmae.main(["--data", str(root), "--output", str(tmp_path / "run"), "--batch-size", "4",
                 "--epochs", "1", "--seed", "3", *TINY_CLI])
    initial = torch.load(tmp_path / "run" / "checkpoint-0000.pth", weights_only=True)
    assert (initial["global_step"], initial["next_epoch"], initial["next_step"]) == (0, 0, 0)
    torch.manual_seed(3)  # the trainer seeds with --seed, then builds the model
    built = CDGMAE(**{**TINY, "img_size": 32, "patch_size": 8}).state_dict()
    assert all(torch.equal(initial["model"][k], built[k]) for k in built)
    trained, _ = final_state(tmp_path / "run")
    assert any(not torch.equal(trained[k], built[k]) for k in built)  # the later checkpoints moved on


def test_decoder_cross_attention_is_one_fused_xavier_draw_like_multihead_attention():
    """CropMAE's cross-attention is nn.MultiheadAttention: q, k and v come from one [3D, D] weight
    drawn xavier-uniform, bound sqrt(6 / (D + 3D)); MAE's Linear init does not touch it."""
    torch.manual_seed(0)
    dim = 256
    model = CDGMAE(**{**TINY, "decoder_embed_dim": dim, "decoder_num_heads": 8})
    bound = math.sqrt(6 / (dim + 3 * dim))  # 0.0765 at D = 256; separate draws: 0.108 (q), 0.088 (kv)
    for block in model.decoder_blocks:
        fused = torch.cat([block.cross_attn.q.weight, block.cross_attn.kv.weight])
        assert fused.shape == (3 * dim, dim)
        assert fused.abs().max() <= bound
        assert fused.abs().max() > 0.99 * bound  # 196,608 uniform draws reach the bound
        assert abs(fused.std().item() - bound / math.sqrt(3)) < 0.01 * bound  # std of U(-a, a) is a / sqrt(3)
    reference = torch.nn.MultiheadAttention(dim, 8).in_proj_weight  # the module CropMAE uses, for comparison
    assert reference.shape == fused.shape and 0.99 * bound < reference.abs().max() <= bound
