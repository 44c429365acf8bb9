"""Bag-of-views generation (Sec. 3.1 and 4): layout, reproducibility, resumability, sharding,
guidance, the DDIM sampler and the CompVis-LDM conversion, on tiny random models built here."""
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import common
import cdgmae
import generate_views as gv
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VQModel

VIEWS = 2
STEPS = 2


# -----------------------------------------------------------------------------
# Tiny models and data
# -----------------------------------------------------------------------------

def tiny_unet(seed=0):
    """8x8x3 latents, two levels (the second with cross-attention), 2 and 4 heads, 32-d context."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4)).eval()


def tiny_vq(seed=1):
    """VQ first stage with a downsampling factor of 2: 8x8x3 latents <-> 16x16 RGB."""
    torch.manual_seed(seed)
    return VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                   latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3, sample_size=16,
                   scaling_factor=1.0).eval()


def tiny_vit(seed=2):
    torch.manual_seed(seed)
    return cdgmae.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1).eval()


def tiny_sldm(seed=0):
    conditioner = gv.Conditioner(tiny_vit(seed + 2), context_dim=32, normalize=True, image_size=32)
    torch.manual_seed(seed + 3)
    conditioner.projection.reset_parameters()
    return gv.SLDM(tiny_unet(seed), tiny_vq(seed + 1), DDIMScheduler(**gv.LDM_DDIM), conditioner.eval())


def tiny_sldm_folder(parent):
    """tiny_sldm() saved as an S-LDM folder, parent/model."""
    gv.save_sldm(parent / "model", tiny_sldm())
    return parent / "model"


@pytest.fixture(scope="module")
def sldm_folder(tmp_path_factory):
    return tiny_sldm_folder(tmp_path_factory.mktemp("sldm"))


@pytest.fixture(scope="module")
def backend(sldm_folder):
    return gv.SLDMBackend(gv.load_sldm(sldm_folder), steps=STEPS, guidance=gv.PAPER_GUIDANCE)


def write_images(root):
    """A small ImageNet-like tree with a nested folder and two formats; returns the relative paths."""
    rng = np.random.default_rng(0)
    files = {"n01/a.JPEG": "JPEG", "n01/b.jpg": "JPEG", "n02/sub/c.png": "PNG"}
    for rel, fmt in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path, format=fmt)
    return sorted(files)


def tree_bytes(root):
    """{relative path: sha256} of every file under root."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def run(backend, images, output, rel_paths=None, batch_size=1, seed=0):
    rel_paths = gv.list_images(images) if rel_paths is None else rel_paths
    return gv.generate_bags(backend, images, rel_paths, output, VIEWS, batch_size=batch_size, seed=seed,
                            workers=0, progress=False)


# -----------------------------------------------------------------------------
# Bags on disk
# -----------------------------------------------------------------------------

def test_bags_mirror_the_input_tree_in_the_layout_cdgmae_trains_on(tmp_path, backend):
    rel = write_images(tmp_path / "images")
    summary = run(backend, tmp_path / "images", tmp_path / "bags", batch_size=2)
    assert summary["generated"] == 3 and not summary["unreadable"]
    expected = set()
    for r in rel:  # BAGS/<folder>/<stem>/{view_00.jpg, view_01.jpg, real.<suffix lowercased>}
        bag = str(Path(r).parent / Path(r).stem)
        expected |= {f"{bag}/view_00.jpg", f"{bag}/view_01.jpg", f"{bag}/real{Path(r).suffix.lower()}"}
    assert set(tree_bytes(tmp_path / "bags")) == expected
    for r in rel:  # the real image is the original file, byte for byte
        bag = tmp_path / "bags" / Path(r).parent / Path(r).stem
        assert (bag / f"real{Path(r).suffix.lower()}").read_bytes() == (tmp_path / "images" / r).read_bytes()
        for k in range(VIEWS):
            with Image.open(bag / f"view_{k:02d}.jpg") as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (16, 16))  # 8x8 latents, VQ factor 2
    bags = common.find_bags(tmp_path / "bags")
    assert bags == ["n01/a", "n01/b", "n02/sub/c"]
    assert common.check_bags(tmp_path / "bags", bags, num_views=VIEWS, min_views=VIEWS + 1) == {}


def test_same_seed_reproduces_the_views_and_another_seed_changes_them(tmp_path, backend):
    write_images(tmp_path / "images")
    run(backend, tmp_path / "images", tmp_path / "first", seed=0)
    run(backend, tmp_path / "images", tmp_path / "again", seed=0)
    run(backend, tmp_path / "images", tmp_path / "other", seed=1)
    first, again, other = (tree_bytes(tmp_path / d) for d in ("first", "again", "other"))
    assert first == again
    views = [k for k in first if "/view_" in k]
    assert all(first[k] != other[k] for k in views)
    assert len({first[k] for k in views}) == len(views)  # every view of every image is different


def test_view_noise_depends_only_on_seed_path_and_view_index():
    shape = (3, 8, 8)
    four = gv.view_noise(0, "n01/a.JPEG", 4, shape)
    two = gv.view_noise(0, "n01/a.JPEG", 2, shape)
    assert torch.equal(four[:2], two)  # asking more views keeps the first ones
    assert not torch.equal(four[0], four[1])
    assert not torch.equal(two, gv.view_noise(0, "n01/b.jpg", 2, shape))
    assert not torch.equal(two, gv.view_noise(1, "n01/a.JPEG", 2, shape))


def test_a_second_run_skips_complete_bags(tmp_path, backend):
    write_images(tmp_path / "images")
    run(backend, tmp_path / "images", tmp_path / "bags")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "bags").rglob("*") if p.is_file()}
    summary = run(backend, tmp_path / "images", tmp_path / "bags")
    assert (summary["complete_before"], summary["generated"], summary["unet_calls"]) == (3, 0, 0)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "bags").rglob("*") if p.is_file()} == before


class SimulatedKill(BaseException):
    pass


def test_a_run_killed_mid_bag_resumes_without_duplicates_or_truncated_files(tmp_path, backend, monkeypatch):
    write_images(tmp_path / "images")
    run(backend, tmp_path / "images", tmp_path / "reference")
    real_replace, calls = os.replace, [0]

    def replace_then_die(src, dst):  # the 5th rename never happens: bag 2 has view_00 and a written .tmp
        calls[0] += 1
        if calls[0] == 5:
            raise SimulatedKill
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(SimulatedKill):
        run(backend, tmp_path / "images", tmp_path / "bags")
    monkeypatch.setattr(os, "replace", real_replace)
    half = tmp_path / "bags" / "n01" / "b"
    assert sorted(os.listdir(half)) == [common.temporary_path(half / "view_01.jpg").name, "view_00.jpg"]
    assert common.find_bags(tmp_path / "bags") == ["n01/a"]  # what the trainer sees is complete

    summary = run(backend, tmp_path / "images", tmp_path / "bags")
    assert (summary["complete_before"], summary["generated"]) == (1, 2)
    assert tree_bytes(tmp_path / "bags") == tree_bytes(tmp_path / "reference")  # no .tmp, no extra file


def test_shards_are_disjoint_and_cover_every_image():
    items = [f"img{i:02d}" for i in range(23)]
    for count in (1, 2, 5, 23, 30):
        shares = [gv.shard_items(items, i, count) for i in range(count)]
        assert sorted(sum(shares, [])) == items  # each image in exactly one shard
    # an array job of 3 (--shard j/3) of torchrun x 2 (RANK, WORLD_SIZE): 6 disjoint shares covering all
    seen = []
    for job in range(3):
        for rank in range(2):
            index, count = gv.resolve_shard((job, 3), {"RANK": str(rank), "WORLD_SIZE": "2"})
            assert count == 6
            seen += gv.shard_items(items, index, count)
    assert sorted(seen) == items
    assert gv.resolve_shard(None, {}) == (0, 1)


def test_sharded_runs_write_the_same_bags_as_one_run(tmp_path, backend):
    write_images(tmp_path / "images")
    rel = gv.list_images(tmp_path / "images")
    run(backend, tmp_path / "images", tmp_path / "whole", rel)
    counts = [run(backend, tmp_path / "images", tmp_path / "sharded", gv.shard_items(rel, i, 2))["generated"]
              for i in range(2)]
    assert counts == [2, 1]
    assert tree_bytes(tmp_path / "sharded") == tree_bytes(tmp_path / "whole")


def test_one_unet_call_per_step_holds_all_views_and_both_guidance_branches(tmp_path, backend):
    write_images(tmp_path / "images")
    batch_sizes = []
    hook = backend.sldm.unet.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    try:
        summary = run(backend, tmp_path / "images", tmp_path / "bags", batch_size=2)
    finally:
        hook.remove()
    # 3 images in batches of 2 and 1: STEPS calls each, of 2 branches x M views x B images
    assert summary["unet_calls"] == 2 * STEPS
    assert batch_sizes == [2 * VIEWS * 2] * STEPS + [2 * VIEWS * 1] * STEPS


def test_unreadable_images_are_logged_skipped_and_counted(tmp_path, backend, capsys):
    write_images(tmp_path / "images")
    (tmp_path / "images" / "n01" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    summary = run(backend, tmp_path / "images", tmp_path / "bags", batch_size=2)
    assert summary["generated"] == 3
    assert [p for p, _ in summary["unreadable"]] == ["n01/broken.jpg"]
    assert "n01/broken.jpg" in capsys.readouterr().err
    assert common.find_bags(tmp_path / "bags") == ["n01/a", "n01/b", "n02/sub/c"]


def test_inputs_that_would_share_a_bag_are_refused_before_any_work(tmp_path):
    write_images(tmp_path / "images")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "n01" / "a.png")
    with pytest.raises(ValueError, match="share a bag folder"):
        gv.list_images(tmp_path / "images")


def test_a_file_list_names_the_same_images_and_bad_lists_or_models_fail_early(tmp_path):
    rel = write_images(tmp_path / "images")
    (tmp_path / "list.txt").write_text("# ImageNet subset\n" + "\n".join(f"./{r}" for r in reversed(rel)) + "\n")
    assert gv.list_images(tmp_path / "images", tmp_path / "list.txt") == gv.list_images(tmp_path / "images") == rel
    (tmp_path / "bad.txt").write_text("n01/a.JPEG\nn01/missing.jpg\n")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        gv.list_images(tmp_path / "images", tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match="not an S-LDM folder"):
        gv.load_sldm(tmp_path / "images")


# -----------------------------------------------------------------------------
# Sampling
# -----------------------------------------------------------------------------

@pytest.mark.float_kernels
def test_guidance_w_is_ho_and_salimans_one_plus_w_conditional_minus_w_unconditional():
    """The paper's "guidance weight of 6 [18]": [18]'s guided noise (1 + w) eps_c - w eps_u, so w = 0
    is the conditional prediction, w = -1 the unconditional one, and w = 6 is eps_u + 7 (eps_c - eps_u)."""
    unet = tiny_unet().double()  # float64 branches: batching both branches in one call changes them by ~1e-15
    torch.manual_seed(5)
    latents, cond, uncond = (torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randn(3, 1, 32, dtype=torch.float64),
                             torch.randn(1, 1, 32, dtype=torch.float64))
    t = torch.tensor(501)
    u = torch.finfo(torch.float32).eps / 2  # float32's unit roundoff
    with torch.no_grad():
        eps_c = unet(latents, t, encoder_hidden_states=cond).sample                       # separate calls
        eps_u = unet(latents, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
        for w, expected in [(6.0, eps_u + 7 * (eps_c - eps_u)), (0.0, eps_c), (-1.0, eps_u), (2.5, None)]:
            expected = (1 + w) * eps_c - w * eps_u if expected is None else expected
            got = gv.guided_noise_prediction(unet, latents, t, cond, uncond, w).double()
            # got rounds each branch to float32, then forms (1 + w) a, w b and their difference in float32:
            # each of these 4 steps errs by <= u times the magnitudes it carries, <= 4 u (|1 + w| |a| + |w| |b|)
            # in all; + 1e-12 for the float64 UNet's own batch dependence and the float64 reference.
            bound = 4 * u * (abs(1 + w) * eps_c.abs() + abs(w) * eps_u.abs()) + 1e-12
            assert ((got - expected).abs() <= bound).all(), w
            # the other reading, eps_u + w (eps_c - eps_u), differs from this one by eps_c - eps_u at every w
            assert (got - (eps_u + w * (eps_c - eps_u))).abs().max() > 100 * bound.max(), w


@pytest.mark.float_kernels
def test_scheduler_is_the_ldm_ddim_discretisation():
    scheduler = DDIMScheduler(**gv.LDM_DDIM)
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(981, 0, -20))  # CompVis: range(0, 1000, 20) + 1
    betas = np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000) ** 2          # CompVis "linear" schedule
    # float32 products of up to 1000 factors: <= 1000 eps = 6e-5 relative
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-4)


@pytest.mark.float_kernels
def test_sampler_is_guided_ddim_with_eta_zero():
    """sample_latents against DDIM written out from the formula (Song et al., eta = 0), on the
    scheduler's own schedule (test_scheduler_is_the_ldm_ddim_discretisation checks it)."""
    unet, steps, w = tiny_unet().double(), 4, 6.0  # float64: the two branches run batched there, apart here
    torch.manual_seed(6)
    noise, cond, uncond = (torch.randn(*shape, dtype=torch.float64) for shape in [(2, 3, 8, 8), (2, 1, 32), (1, 1, 32)])
    scheduler = DDIMScheduler(**gv.LDM_DDIM)
    got = gv.sample_latents(unet, scheduler, noise, cond, uncond, w, steps)

    alpha_bar = scheduler.alphas_cumprod.double().numpy()
    timesteps = [t + 1 for t in range(0, 1000, 1000 // steps)][::-1]        # 751, 501, 251, 1
    x = noise
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            eps_c = unet(x, t, encoder_hidden_states=cond).sample
            eps_u = unet(x, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
            eps = (1 + w) * eps_c - w * eps_u  # Ho & Salimans' w (the paper's [18])
            a_t = alpha_bar[t]
            a_prev = alpha_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else alpha_bar[0]
            x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
            x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    # float32 remains in sample_latents' cast of eps and the scheduler's arithmetic: a few eps (6e-8) of
    # terms up to ~60 (x0 reaches 51 through 1 / sqrt(abar_751) = 11), ~2e-5 a step, 1e-4 over the 4 steps,
    # x 10 for the UNet passing earlier differences on; every timestep one lower moves the result by 0.9
    torch.testing.assert_close(got, x, rtol=0, atol=1e-3)


@pytest.mark.float_kernels
def test_conditioner_projects_the_normalised_cls_token_and_zero_for_unconditional():
    sldm = tiny_sldm()
    c = sldm.conditioner
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls = c.vit(x)[:, 0]
        expected = (cls / cls.norm(dim=-1, keepdim=True)) @ c.projection.weight.T + c.projection.bias
        # float32 dot products of 64 terms (a unit vector times weight rows of norm < 1), summed in another
        # order: <= 2 * 64 eps = 8e-6
        torch.testing.assert_close(c(x), expected.unsqueeze(1), rtol=0, atol=1e-5)
        assert torch.equal(c.unconditional(), c.projection.bias.view(1, 1, -1))  # W 0 + b is b exactly


# -----------------------------------------------------------------------------
# CompVis-LDM conversion
# -----------------------------------------------------------------------------

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_unet_keys(state, layers_per_block, attention_levels):
    """diffusers UNet keys -> CompVis openaimodel.UNetModel keys, written from that model's layout:
    input_blocks[0] = conv_in; each level has `layers_per_block` [ResBlock(, SpatialTransformer)]
    then a Downsample (.op); middle_block = Res, Transformer, Res; each up level has
    layers_per_block + 1 blocks, the last one ending with an Upsample (.conv)."""
    L, out = layers_per_block, {}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        if head in fixed:
            out[f"{fixed[head]}.{leaf}"] = value
            continue
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        n = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if side == "down":
                block = {"downsamplers": (b + 1) * (L + 1)}.get(kind, 1 + b * (L + 1) + j)
                name = f"input_blocks.{block}"
            else:
                block = b * (L + 1) + (L if kind == "upsamplers" else j)
                name = f"output_blocks.{block}"
        else:
            kind, j, rest = n.group(1), int(n.group(2)), n.group(3)
            name = f"middle_block.{1 if kind == 'attentions' else 2 * j}"
        if kind == "resnets":
            sub, _, leaf = rest.rpartition(".")
            out[f"{name}{'' if m is None else '.0'}.{RESNET_TO_LDM[sub]}.{leaf}"] = value
        elif kind == "attentions":
            out[f"{name}{'' if m is None else '.1'}.{rest}"] = value
        elif kind == "downsamplers":
            out[f"{name}.0.op.{rest.split('.')[-1]}"] = value
        else:  # Upsample sits after the ResBlock and, at attention levels, the transformer
            level = len(attention_levels) - 1 - b
            out[f"{name}.{2 if attention_levels[level] else 1}.conv.{rest.split('.')[-1]}"] = value
    return out


def ldm_first_stage_keys(state, levels):
    """diffusers VQModel keys -> CompVis VQModel keys (taming-transformers Encoder/Decoder)."""
    out = {}
    for key, value in state.items():
        k = key
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", k)
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        attn = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", k)
        if attn:
            sub = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[attn.group(2)]
            k = f"{attn.group(1)}.mid.attn_1.{sub}.{attn.group(3)}"
            if value.ndim == 2:  # 1x1 convolutions in CompVis
                value = value[:, :, None, None]
        out[k] = value
    return out


@pytest.fixture(scope="module")
def compvis_checkpoint(tmp_path_factory):
    """A tiny CompVis-style S-LDM: state_dict with model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.patch_fc.*, its yaml, and a DINO-style plain ViT state dict."""
    root = tmp_path_factory.mktemp("compvis")
    unet, vq, vit = tiny_unet(10), tiny_vq(11), tiny_vit(12)
    torch.manual_seed(13)
    patch_fc = torch.nn.Linear(64, 32)
    state = {f"model.diffusion_model.{k}": v.clone() for k, v in
             ldm_unet_keys(unet.state_dict(), 1, attention_levels=[False, True]).items()}
    state.update({f"first_stage_model.{k}": v.clone() for k, v in ldm_first_stage_keys(vq.state_dict(), 2).items()})
    state.update({f"cond_stage_model.patch_fc.{k}": v.clone() for k, v in patch_fc.state_dict().items()})
    torch.save({"state_dict": state, "global_step": 7}, root / "model.ckpt")
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 8, "channels": 3,
        "conditioning_key": "crossattn", "cond_stage_trainable": True,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32, "attention_resolutions": [2],
            "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16, "use_spatial_transformer": True,
            "transformer_depth": 1, "context_dim": 32, "use_fp16": True}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": 3, "n_embed": 16, "ddconfig": {
                "double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.PatchEmbedder", "params": {
            "patch_embed_dim": 64, "target_dim": 32, "normalize_ssl": True}}}}}
    (root / "model.yaml").write_text(yaml.safe_dump(config))
    torch.save(vit.state_dict(), root / "dino.pth")
    gv.main(["convert", "--ldm-checkpoint", str(root / "model.ckpt"), "--ldm-config", str(root / "model.yaml"),
             "--dino", str(root / "dino.pth"), "--output", str(root / "sldm"), "--cond-image-size", "32"])
    return {"folder": root / "sldm", "unet": unet, "vq": vq, "vit": vit, "patch_fc": patch_fc}


@pytest.mark.float_kernels
def test_converted_unet_computes_what_the_directly_built_unet_computes(compvis_checkpoint):
    converted = gv.load_sldm(compvis_checkpoint["folder"]).unet
    direct = compvis_checkpoint["unet"]
    assert converted.config.attention_head_dim == [2, 4]  # CompVis num_head_channels 16 at widths 32, 64
    torch.manual_seed(7)
    x, ctx = torch.randn(2, 3, 8, 8), torch.randn(2, 1, 32)
    with torch.no_grad():
        for t in (1, 500, 999):
            # one architecture with the same weights on the same input: the same operations, equal to the bit
            assert torch.equal(converted(x, t, encoder_hidden_states=ctx).sample,
                               direct(x, t, encoder_hidden_states=ctx).sample)


@pytest.mark.float_kernels
def test_converted_first_stage_and_projection_match_the_originals(compvis_checkpoint):
    sldm = gv.load_sldm(compvis_checkpoint["folder"])
    torch.manual_seed(8)
    z = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        # the same modules with the same weights on the same inputs: equal to the bit
        assert torch.equal(sldm.vae.decode(z).sample, compvis_checkpoint["vq"].decode(z).sample)
        x = torch.randn(2, 3, 32, 32)
        cls = compvis_checkpoint["vit"](x)[:, 0]
        expected = compvis_checkpoint["patch_fc"](torch.nn.functional.normalize(cls, dim=-1)).unsqueeze(1)
        assert torch.equal(sldm.conditioner(x), expected)  # normalize_ssl read from the yaml
    assert sldm.vae.config.scaling_factor == 1.0  # LatentDiffusion's default scale_factor
    sldm.scheduler.set_timesteps(50)
    assert sldm.scheduler.timesteps.tolist() == list(range(981, 0, -20))


def test_conversion_refuses_a_checkpoint_with_unconverted_keys(compvis_checkpoint, tmp_path):
    root = compvis_checkpoint["folder"].parent
    state = torch.load(root / "model.ckpt", weights_only=True)["state_dict"]
    state["model.diffusion_model.input_blocks.1.0.extra.weight"] = torch.zeros(3)
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="extra.weight"):
        gv.convert_ldm(tmp_path / "bad.ckpt", root / "model.yaml", root / "dino.pth", tmp_path / "out", 32)
    assert not (tmp_path / "out").exists()


def test_conversion_refuses_a_checkpoint_that_lacks_a_tensor_of_the_model(compvis_checkpoint, tmp_path):
    root = compvis_checkpoint["folder"].parent
    state = torch.load(root / "model.ckpt", weights_only=True)["state_dict"]
    del state["model.diffusion_model.out.2.bias"]  # the UNet's last convolution: diffusers' conv_out
    torch.save({"state_dict": state}, tmp_path / "short.ckpt")
    with pytest.raises(ValueError, match=r"lacks: \['conv_out.bias'\]"):
        gv.convert_ldm(tmp_path / "short.ckpt", root / "model.yaml", root / "dino.pth", tmp_path / "out", 32)
    assert not (tmp_path / "out").exists()


@pytest.mark.float_kernels
def test_a_kl_first_stage_and_the_other_unet_options_convert_to_the_same_computation(tmp_path):
    """The options the fixture above leaves at one value: num_heads instead of num_head_channels,
    two transformer blocks per SpatialTransformer, scale-shift norm, Linear proj_in/proj_out, two
    ResBlocks per level over three levels, a KL first stage with a stored scale_factor, no
    normalisation of the SSL embedding."""
    torch.manual_seed(20)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(32, 32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=2, transformer_layers_per_block=2,
                                use_linear_projection=True, resnet_time_scale_shift="scale_shift").eval()
    kl = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                       latent_channels=4, sample_size=16).eval()
    patch_fc, vit = torch.nn.Linear(64, 32), tiny_vit(21)
    state = {f"model.diffusion_model.{k}": v.clone() for k, v in
             ldm_unet_keys(unet.state_dict(), 2, attention_levels=[False, True, True]).items()}
    state.update({f"first_stage_model.{k}": v.clone() for k, v in ldm_first_stage_keys(kl.state_dict(), 2).items()})
    state.update({f"cond_stage_model.patch_fc.{k}": v.clone() for k, v in patch_fc.state_dict().items()})
    state["scale_factor"] = torch.tensor(0.25)  # LatentDiffusion's buffer when scale_by_std
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "conditioning_key": "crossattn", "scale_by_std": True,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "attention_resolutions": [2, 4], "num_res_blocks": 2, "channel_mult": [1, 1, 2], "num_heads": 2,
            "use_spatial_transformer": True, "transformer_depth": 2, "context_dim": 32,
            "use_scale_shift_norm": True, "use_linear_in_transformer": True}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "ddconfig": {
                "double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.PatchEmbedder", "params": {
            "normalize_ssl": False}}}}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config))
    torch.save(vit.state_dict(), tmp_path / "dino.pth")
    gv.convert_ldm(tmp_path / "model.ckpt", tmp_path / "model.yaml", tmp_path / "dino.pth", tmp_path / "sldm", 32)
    sldm = gv.load_sldm(tmp_path / "sldm")
    assert sldm.unet.config.attention_head_dim == 2  # CompVis num_heads: 2 heads at every level
    assert isinstance(sldm.vae, AutoencoderKL) and sldm.vae.config.scaling_factor == 0.25
    for module in (unet, kl, patch_fc, vit):  # as load_sldm sets its pieces up (the kernels may depend on it)
        module.requires_grad_(False)
    torch.manual_seed(21)
    x, ctx, z = torch.randn(2, 4, 8, 8), torch.randn(2, 1, 32), torch.randn(2, 4, 8, 8)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # one architecture with the same weights on the same input: the same operations, equal to the bit
        for t in (1, 500, 999):
            assert torch.equal(sldm.unet(x, t, encoder_hidden_states=ctx).sample,
                               unet(x, t, encoder_hidden_states=ctx).sample)
        assert torch.equal(sldm.vae.decode(z).sample, kl.decode(z).sample)
        assert torch.equal(sldm.conditioner(image), patch_fc(vit(image)[:, 0]).unsqueeze(1))  # normalize_ssl False


def test_ema_converts_litemas_copies_of_the_unet_and_is_refused_without_them(compvis_checkpoint, tmp_path):
    root = compvis_checkpoint["folder"].parent
    state = torch.load(root / "model.ckpt", weights_only=True)["state_dict"]
    # LitEma (ldm/modules/ema.py) keeps a copy of every parameter of LatentDiffusion.model under the
    # parameter's name without its dots: model_ema.diffusion_modelinput_blocks00weight, ...
    torch.manual_seed(22)
    for key in [k for k in state if k.startswith("model.diffusion_model.")]:
        state["model_ema." + key.removeprefix("model.").replace(".", "")] = state[key]
        state[key] = torch.randn_like(state[key])  # the training weights: other values
    state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)})
    torch.save({"state_dict": state}, tmp_path / "ema.ckpt")
    for ema in (True, False):
        gv.convert_ldm(tmp_path / "ema.ckpt", root / "model.yaml", root / "dino.pth", tmp_path / f"sldm-{ema}", 32,
                       extract_ema=ema)
    direct = compvis_checkpoint["unet"].state_dict()
    with_ema, without = (gv.load_sldm(tmp_path / f"sldm-{ema}").unet.state_dict() for ema in (True, False))
    assert all(torch.equal(with_ema[k], direct[k]) for k in direct)
    assert not any(torch.equal(without[k], direct[k]) for k in direct)
    with pytest.raises(ValueError, match=r"no EMA copy \(model_ema\.\*\) of 208 UNet weights.*convert without --ema"):
        gv.convert_ldm(root / "model.ckpt", root / "model.yaml", root / "dino.pth", tmp_path / "none", 32,
                       extract_ema=True)
    assert not (tmp_path / "none").exists()


# -----------------------------------------------------------------------------
# End to end: whatever generate_views.py writes, cdgmae.py trains on
# -----------------------------------------------------------------------------

def test_generated_bags_train_cdgmae_for_two_steps(tmp_path, sldm_folder):
    write_images(tmp_path / "images")
    Image.fromarray(np.full((40, 48, 3), 200, np.uint8)).save(tmp_path / "images" / "n02" / "d.jpg")
    summary = gv.main(["--images", str(tmp_path / "images"), "--model", str(sldm_folder), "--output",
                       str(tmp_path / "bags"), "--views", "2", "--steps", "2", "--batch-size", "2", "--workers", "0",
                       "--device", "cpu", "--no-progress"])
    assert summary["generated"] == 4
    cdgmae.main(["--data", str(tmp_path / "bags"), "--output", str(tmp_path / "run"), "--views", "2",
                 "--anchors", "1", "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--decoder-dim", "32",
                 "--decoder-depth", "1", "--decoder-heads", "2", "--decoder-ffn-dim", "64", "--patch-size", "8",
                 "--input-size", "32", "--batch-size", "2", "--workers", "0", "--epochs", "1", "--max-steps", "2"])
    ckpt = torch.load(tmp_path / "run" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert "model" in ckpt and "decoder_pred.weight" in ckpt["model"]
