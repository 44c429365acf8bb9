"""DIFT features for label propagation (propagate.py, "DIFT features"; DIFT Sec. 4.2, App. C.3),
on tiny random diffusion models built here: the hooked block, the timestep's noise, the
ensemble average, the feature stride, both model folders and the command line's preset."""
import json
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VQModel
from PIL import Image

import cdgmae
import evaluate as ev
import generate_views as gv
import propagate as pr
import toyworld as tw

pytestmark = pytest.mark.float_kernels  # the verdicts compare float results of torch's kernels

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's scaled-linear schedule


@pytest.fixture(autouse=True, scope="module")
def plain_cpu_convolutions():
    """oneDNN compiles a kernel on each of the first few calls of every tiny convolution (seconds
    on 2 cores); torch's own kernels give the same results without that wait. This module only."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


def sd_alpha_bar():
    """abar_t = prod_{s <= t} (1 - beta_s), beta linear in sqrt from 0.00085 to 0.012 over 1000 steps."""
    betas = torch.linspace(SD_BETAS["beta_start"] ** 0.5, SD_BETAS["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def tiny_unet(channels=(32, 64), in_channels=4, seed=0):
    """A cross-attention UNet (32-d context) with len(channels) levels, the last without attention."""
    torch.manual_seed(seed)
    levels = len(channels)
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=channels, cross_attention_dim=32, attention_head_dim=2,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)).eval()


def tiny_kl_vae(seed=1, levels=2):
    """KL autoencoder with a downsampling factor of 2 ** (levels - 1) (levels = 4: SD's 8) and a
    scaling factor that is not 1."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(32,) * levels,
                         layers_per_block=1, latent_channels=4, sample_size=16, scaling_factor=0.5).eval()


def tiny_vq(seed=4, levels=2):
    """VQ first stage with a downsampling factor of 2 ** (levels - 1) (levels = 3: the S-LDM's VQ-f4)."""
    torch.manual_seed(seed)
    return VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                   up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(32,) * levels,
                   layers_per_block=1, latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3, sample_size=16,
                   scaling_factor=1.0).eval()


def sd_scheduler():
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", **SD_BETAS)


def tiny_dift(channels=(32, 64), up_block=1, ensemble_size=2, timestep=51, unet=None, vae=None):
    context = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(5))
    return pr.DiftFeatures(unet or tiny_unet(channels), vae or tiny_kl_vae(), sd_scheduler(), context,
                           timestep=timestep, up_block=up_block, ensemble_size=ensemble_size)


def manual_up_block_outputs(unet, x, t, context):
    """The UNet's forward written out module by module: every up-block's output and the final output."""
    emb = unet.time_embedding(unet.time_proj(torch.full((len(x),), t)).to(x.dtype))
    ctx = context.expand(len(x), -1, -1)
    h = unet.conv_in(x)
    skips = (h,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=ctx)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips += res
    h = unet.mid_block(h, emb, encoder_hidden_states=ctx)
    outputs = []
    for block in unet.up_blocks:
        res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, res_hidden_states_tuple=res, temb=emb, encoder_hidden_states=ctx)
        else:
            h = block(hidden_states=h, res_hidden_states_tuple=res, temb=emb)
        outputs.append(h)
    return outputs, unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


# -----------------------------------------------------------------------------
# The feature: which block, which noise, which average, which stride
# -----------------------------------------------------------------------------

@torch.no_grad()
def test_the_feature_is_the_output_of_up_block_n():
    unet = tiny_unet()
    x = torch.randn(2, 4, 8, 12)
    context = torch.randn(1, 3, 32)
    outputs, final = manual_up_block_outputs(unet, x, 51, context)
    # the same modules in the same order on the same tensors: equal to the bit
    assert torch.equal(final, unet(x, 51, encoder_hidden_states=context.expand(2, -1, -1)).sample)
    for n in range(len(unet.up_blocks)):
        got = pr.up_block_output(unet, x, 51, context, n)
        assert got.shape == outputs[n].shape and torch.equal(got, outputs[n])
    assert not unet.up_blocks[0]._forward_hooks  # the hook is removed again


def test_timestep_noise_is_q_xt_given_x0_with_the_models_schedule():
    alpha_bar = sd_alpha_bar()
    x0, eps = torch.randn(3, 4, 8, 12), torch.randn(3, 4, 8, 12)
    for t in (0, 51, 261):
        expected = math.sqrt(alpha_bar[t]) * x0 + math.sqrt(1 - alpha_bar[t]) * eps
        # float32 schedule, two products and a sum: a few eps times |x| (< 6 for normal draws), < 1e-6
        assert torch.allclose(pr.noised_latents(sd_scheduler(), x0, eps, t), expected.float(), rtol=0, atol=1e-5)


@torch.no_grad()
def test_the_unet_sees_the_noised_scaled_posterior_sample_at_timestep_t():
    dift = tiny_dift()
    image = torch.rand(1, 3, 16, 24) * 2 - 1
    posterior_noise, noise = torch.randn(2, 1, 4, 8, 12), torch.randn(2, 1, 4, 8, 12)
    seen = {}
    dift.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0], t=args[1]), with_kwargs=True)
    dift.ensemble(image, posterior_noise, noise)
    dist = dift.vae.encode(image).latent_dist
    x0 = (dist.mean + dist.std * posterior_noise[:, 0]) * 0.5  # the VAE's scaling factor
    abar = float(sd_alpha_bar()[51])
    assert seen["t"] == 51
    # the same encoder call; float32 schedule, products and sums: a few eps times |x| (< 6), < 1e-6
    assert torch.allclose(seen["x"], math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise[:, 0], rtol=0, atol=1e-5)


@torch.no_grad()
def test_ensemble_averages_the_features_of_single_draws():
    # float64 models: one batch of 3 draws and 3 batches of 1 sum in other orders, ~1e-14 apart in float64;
    # the features are rounded to float32 once at the end, so they differ by at most that one rounding,
    # eps |f| = 6e-8 * |f| (|f| < 4), while two draws differ by about 2
    dift = tiny_dift(ensemble_size=3, unet=tiny_unet().double(), vae=tiny_kl_vae().double())
    image = torch.rand(1, 3, 16, 24, dtype=torch.float64) * 2 - 1
    posterior_noise, noise = torch.randn(3, 1, 4, 8, 12).double(), torch.randn(3, 1, 4, 8, 12).double()
    together = dift.ensemble(image, posterior_noise, noise)
    singles = [dift.ensemble(image, posterior_noise[e:e + 1], noise[e:e + 1]) for e in range(3)]
    assert torch.allclose(together, torch.stack(singles).mean(0), rtol=0, atol=1e-6)
    assert not torch.allclose(singles[0], singles[1], atol=1e-3)  # the draws do differ


@pytest.mark.parametrize("channels", [(32, 64), (32, 64, 64)])
def test_feature_stride_and_width_follow_the_unets_blocks(channels):
    # VAE factor 2; up-block n is followed by L - 2 - n upsampling blocks (none for the last one):
    # SD's four levels give 32, 16, 8, 8 (DIFT's eval_davis.py index2factor).
    unet, vae = tiny_unet(channels), tiny_kl_vae()
    frames = torch.randn(1, 3, 16, 32)
    for n in range(len(channels)):
        dift = tiny_dift(up_block=n, ensemble_size=1, unet=unet, vae=vae)
        stride = 2 * 2 ** max(len(channels) - 2 - n, 0)
        assert dift.patch_size == stride and dift.embed_dim == channels[::-1][n]
        features = dift(frames)
        assert features.shape == (1, channels[::-1][n], 16 // stride, 32 // stride)
        # float32 unit vectors of C <= 64 components: |norm - 1| <= (C + 2) eps ~ 4e-6
        assert torch.allclose(features.norm(dim=1), torch.ones(1, 16 // stride, 32 // stride), rtol=0, atol=1e-5)


def test_sd_strides_are_those_dift_states():
    class Block:
        def __init__(self, upsamples):
            self.upsamplers = [object()] if upsamples else None

    class UNet:
        up_blocks = [Block(True), Block(True), Block(True), Block(False)]

    class VAE:
        class config:
            block_out_channels = (128, 256, 512, 512)

    assert [pr.up_block_stride(UNet, VAE, n) for n in range(4)] == [32, 16, 8, 8]  # n = 2: stride 8 (App. C.3)


@torch.no_grad()
@torch.no_grad()
@pytest.mark.parametrize("shape", ["stable-diffusion", "sldm"])
def test_the_block_is_the_first_at_difts_stride_of_8_on_sd_and_sldm_shaped_unets(shape):
    """App. C.3 takes the feature map at "1/8 of the input". Four-level UNets: SD's KL-f8 latents give
    up-block strides 32, 16, 8, 8 (n = 2, DIFT_sd's index); the S-LDM's VQ-f4 latents give 16, 8, 4, 4,
    where n = 2 would be stride 4 (a 15-cell radius: 60 px instead of 120), so its block is n = 1."""
    channels = (32, 32, 64, 64)
    unet = tiny_unet(channels, in_channels=4 if shape == "stable-diffusion" else 3)
    vae = tiny_kl_vae(levels=4) if shape == "stable-diffusion" else tiny_vq(levels=3)
    strides = [8 * 4, 8 * 2, 8, 8] if shape == "stable-diffusion" else [4 * 4, 4 * 2, 4, 4]
    expected = 2 if shape == "stable-diffusion" else 1
    dift = pr.DiftFeatures(unet, vae, sd_scheduler(), torch.randn(1, 3, 32), ensemble_size=1)
    assert dift.up_block == expected and dift.patch_size == 8 and dift.embed_dim == channels[::-1][expected]
    assert dift(torch.randn(1, 3, 64, 96)).shape == (1, channels[::-1][expected], 64 // 8, 96 // 8)
    for n, stride in enumerate(strides):  # an explicit block is kept, whatever its stride
        fixed = pr.DiftFeatures(unet, vae, sd_scheduler(), torch.randn(1, 3, 32), up_block=n, ensemble_size=1)
        assert (fixed.up_block, fixed.patch_size, fixed.embed_dim) == (n, stride, channels[::-1][n])
    record = dift.description()  # what propagation.json keeps of the extractor
    assert (record["up_block"], record["stride"], record["channels"]) == (expected, 8, channels[::-1][expected])


def test_a_unet_without_a_block_at_stride_8_is_named_with_its_strides():
    with pytest.raises(ValueError, match=r"DiftFeatures: no up-block .* stride 8 \(up-block strides \[2, 2\]; "
                                         r"choose one with --dift-up-block\)"):
        tiny_dift(up_block=None)


@torch.no_grad()
def test_a_frames_features_depend_on_its_pixels_not_on_its_batch():
    dift = tiny_dift()
    a, b = torch.randn(1, 3, 16, 24), torch.randn(1, 3, 16, 24)
    together = dift(torch.cat([a, b]))  # frames run one at a time: the same operations, equal to the bit
    assert torch.equal(together[1:], dift(b)) and torch.equal(together[:1], dift(a))


# -----------------------------------------------------------------------------
# Model folders
# -----------------------------------------------------------------------------

def tiny_sldm_folder(folder, channels=(32, 64), vq_levels=2):
    """A random S-LDM folder; channels=(32, 32, 64, 64), vq_levels=3 gives the S-LDM's shape (VQ-f4, four levels)."""
    torch.manual_seed(3)
    conditioner = gv.Conditioner(cdgmae.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1,
                                                          num_heads=1), context_dim=32, image_size=32)
    gv.save_sldm(folder, gv.SLDM(tiny_unet(channels, in_channels=3), tiny_vq(levels=vq_levels),
                                 DDIMScheduler(**gv.LDM_DDIM), conditioner.eval()))
    return folder


@torch.no_grad()
def test_sldm_folder_gives_the_unconditional_context_and_vq_latents(tmp_path):
    folder = tiny_sldm_folder(tmp_path / "sldm")
    dift = pr.load_dift(folder, up_block=1, ensemble_size=2)
    projection = torch.load(folder / "conditioner/projection.pth", weights_only=True)
    # the projection of a zero embedding is the projection's bias (W 0 + b = b exactly)
    assert torch.equal(dift.context, projection["bias"].view(1, 1, 32))
    assert torch.equal(dift.scheduler.alphas_cumprod, DDIMScheduler(**gv.LDM_DDIM).alphas_cumprod)  # one computation
    image = torch.rand(1, 3, 16, 24) * 2 - 1
    x0 = pr.image_latents(dift.vae, image, torch.randn(2, 1, 3, 8, 12))
    # no posterior noise: the encoder's latents, from the same call on the same image (equal to the bit)
    assert torch.equal(x0[0], x0[1]) and torch.equal(x0[0], dift.vae.encode(image).latents)
    assert dift(torch.randn(1, 3, 16, 24)).shape == (1, 32, 8, 12)


def tiny_sd_folder(folder):
    transformers = pytest.importorskip("transformers")
    tiny_unet().save_pretrained(folder / "unet")
    tiny_kl_vae().save_pretrained(folder / "vae")
    sd_scheduler().save_pretrained(folder / "scheduler")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "photo</w>": 3}
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=7)
    tokenizer.save_pretrained(folder / "tokenizer")
    torch.manual_seed(6)
    config = transformers.CLIPTextConfig(vocab_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=7, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1)
    transformers.CLIPTextModel(config).eval().save_pretrained(folder / "text_encoder")
    return folder


@torch.no_grad()
def test_stable_diffusion_folder_gives_the_empty_prompt_embedding(tmp_path):
    folder = tiny_sd_folder(tmp_path / "sd")
    import transformers
    dift = pr.load_dift(folder, up_block=1)
    ids = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])  # "": start, end, then padding (the end token) to 7
    text_encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    # the same encoder on the same ids: equal to the bit
    assert torch.equal(dift.context, text_encoder(ids)[0]) and dift.context.shape == (1, 7, 32)
    assert dift.source == "stable-diffusion" and dift.patch_size == 2


def test_block_or_timestep_outside_the_model_is_named(tmp_path):
    folder = tiny_sldm_folder(tmp_path / "sldm")
    with pytest.raises(ValueError, match="up-block 2 does not exist, the UNet has 2"):
        pr.load_dift(folder, up_block=2)
    with pytest.raises(ValueError, match=r"timestep 1000 is outside the schedule's 0\.\.999"):
        pr.load_dift(folder, up_block=1, timestep=1000)


def test_folder_that_is_no_model_is_named(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not a diffusion model folder.*vae/config.json"):
        pr.load_dift(tmp_path)


# -----------------------------------------------------------------------------
# Propagation with DIFT's preset, through the command line
# -----------------------------------------------------------------------------

def test_command_line_runs_dift_with_its_preset_on_a_toy_davis(tmp_path):
    tw.write_davis(tmp_path / "DAVIS", num_videos=1, frames=3, height=64, width=96, progress=False)
    folder = tiny_sldm_folder(tmp_path / "sldm")
    out = tmp_path / "pred"
    pr.main(["--dataset", "davis", "--data-root", str(tmp_path / "DAVIS"), "--checkpoint", str(folder),
             "--output", str(out), "--features", "dift", "--dift-up-block", "1", "--dift-ensemble", "2",
             "--input-size", "32", "48"])
    record = json.loads((out / "propagation.json").read_text())
    # App. C.3 DAVIS row, with the explicit --input-size kept
    assert (record["topk"], record["queue_length"], record["radius"], record["temperature"]) == (15, 28, 15, 0.2)
    assert record["input_size"] == [32, 48] and record["checkpoint"] == str(folder.resolve())
    assert ev.evaluate_dataset("davis", tmp_path / "DAVIS", out, progress=False)["objects"] >= 1
    assert record["encoder"]["features"] == "dift" and record["encoder"]["timestep"] == 51
    png = Image.open(out / "toy000/00002.png")
    assert png.mode == "P" and png.size == (96, 64)
    with pytest.raises(SystemExit, match="encoder"):  # other DIFT settings into the same folder
        pr.main(["--dataset", "davis", "--data-root", str(tmp_path / "DAVIS"), "--checkpoint", str(folder),
                 "--output", str(out), "--features", "dift", "--dift-up-block", "1", "--dift-ensemble", "2",
                 "--input-size", "32", "48", "--dift-timestep", "101"])


def test_static_video_keeps_its_mask_with_dift_features(tmp_path):
    # identical frames draw identical noise, so every frame's features equal frame 0's
    root = tmp_path / "DAVIS"
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    ids = np.zeros((32, 48), np.uint8)
    ids[8:16], ids[24:32] = 1, 2
    for t in range(3):
        (root / "JPEGImages/480p/seq").mkdir(parents=True, exist_ok=True)
        image.save(root / f"JPEGImages/480p/seq/{t:05d}.png")
        ev.write_palette_png(root / f"Annotations/480p/seq/{t:05d}.png", ids)
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "ImageSets/2017/val.txt").write_text("seq\n")
    pr.propagate_dataset("davis", root, tiny_dift(), tmp_path / "pred", input_size=(32, 48), progress=False)
    assert ev.evaluate_dataset("davis", root, tmp_path / "pred", progress=False)["J&F_m"] == 100.0


def test_command_line_takes_the_stride_8_block_of_an_sldm_shaped_folder_and_records_it(tmp_path):
    tw.write_davis(tmp_path / "DAVIS", num_videos=1, frames=3, height=64, width=96, progress=False)
    folder = tiny_sldm_folder(tmp_path / "sldm", channels=(32, 32, 64, 64), vq_levels=3)
    argv = ["--dataset", "davis", "--data-root", str(tmp_path / "DAVIS"), "--checkpoint", str(folder),
            "--features", "dift", "--dift-ensemble", "1", "--input-size", "64", "96"]
    pr.main([*argv, "--output", str(tmp_path / "pred")])
    encoder = json.loads((tmp_path / "pred" / "propagation.json").read_text())["encoder"]
    assert (encoder["up_block"], encoder["stride"], encoder["channels"]) == (1, 8, 64)  # VQ-f4: 16, 8, 4, 4
    pr.main([*argv, "--output", str(tmp_path / "pred"), "--dift-up-block", "1"])  # the same block: a resume
    with pytest.raises(SystemExit, match="encoder"):  # DIFT_sd's index, here stride 4: other features
        pr.main([*argv, "--output", str(tmp_path / "pred"), "--dift-up-block", "2"])
    small = tiny_sldm_folder(tmp_path / "small")  # VQ-f2, two levels: strides 4, 2
    with pytest.raises(SystemExit) as exit_info:
        pr.main([*argv[:5], str(small), *argv[6:], "--output", str(tmp_path / "other")])
    assert str(exit_info.value.code).startswith(f"{small.resolve()}: no up-block")
    assert "--dift-up-block" in str(exit_info.value.code) and not (tmp_path / "other").exists()


def test_unloadable_model_folder_is_one_line(tmp_path):
    tw.write_davis(tmp_path / "DAVIS", num_videos=1, frames=3, height=64, width=96, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        pr.main(["--dataset", "davis", "--data-root", str(tmp_path / "DAVIS"), "--checkpoint", str(tmp_path / "none"),
                 "--output", str(tmp_path / "pred"), "--features", "dift"])
    assert str(exit_info.value.code).startswith(f"{tmp_path / 'none'}: not a diffusion model folder")
    assert not (tmp_path / "pred").exists()
