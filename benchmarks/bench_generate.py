"""Throughput of bag-of-views generation (generate_views.py) and a FLOP-based estimate at the real size.

1. UNet calls and UNet evaluations per real image, and images/s, with a tiny random S-LDM on
   this machine (the sampling the paper uses: 50 DDIM steps, guidance, M = 4 views).
2. Multiply-accumulates of one forward pass of an S-LDM of the real size (random weights):
   the CompVis LDM-cin256-v2 UNet (the ImageNet UNet that the lab's S-LDMs start from, 64x64x3
   latents, 512-d context), the VQ-f4 decoder (256x256 images) and the DINO ViT-B/16 conditioner;
   from them the FLOPs per real image and what the paper's 48 h / 1.28M images / 8 A100 implies.
   An estimate: no GPU was measured here.

Usage:
    python benchmarks/bench_generate.py                  # both parts
    python benchmarks/bench_generate.py --skip-real-size # only the tiny-model timing
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cdgmae  # noqa: E402
import generate_views as gv  # noqa: E402

# The lab's public S-LDM configs (Large-Image-Diffusion, e.g. configs/latent-diffusion/satellite/naip.yaml):
# the LDM-cin256-v2 UNet, a VQ-f4 first stage, DINO ViT-B/16 cls -> Linear(768, 512).
REAL_SIZE_CONFIG = {"model": {"params": {
    "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "conditioning_key": "crossattn",
    "unet_config": {"params": {
        "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
        "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5], "num_heads": 1,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512}},
    "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
        "embed_dim": 3, "n_embed": 8192, "ddconfig": {
            "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}}}}}

A100_BF16_PEAK = 312e12      # dense tensor-core FLOP/s (NVIDIA A100 datasheet)
PAPER_GPU_SECONDS_PER_IMAGE = 48 * 3600 * 8 / 1.28e6   # 48 h on 8 A100 for ImageNet-1K: 1.08 GPU-s


def tiny_sldm():
    from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4))
    vae = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                  latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3, sample_size=16, scaling_factor=1.0)
    vit = cdgmae.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1)
    return gv.SLDM(unet.eval(), vae.eval(), DDIMScheduler(**gv.LDM_DDIM), gv.Conditioner(vit, 32, True, 32).eval())


def real_size_sldm(device="cpu", unet_dtype=torch.float32):
    """An S-LDM of the real size with random weights, as load_sldm sets one up: the LDM-cin256-v2
    UNet in `unet_dtype`, the VQ-f4 first stage and the DINO ViT-B/16 conditioner (224x224, cls
    -> Linear(768, 512)) in float32, all on `device`."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**gv.ldm_unet_config(REAL_SIZE_CONFIG))
    context_dim = REAL_SIZE_CONFIG["model"]["params"]["unet_config"]["params"]["context_dim"]
    conditioner = gv.Conditioner(cdgmae.vit_base(patch_size=16), context_dim, True, 224)
    sldm = gv.SLDM(unet.to(device, unet_dtype).eval(), gv.ldm_first_stage(REAL_SIZE_CONFIG, {}).eval().to(device),
                   DDIMScheduler(**gv.LDM_DDIM), conditioner.to(device).eval())
    for module in (sldm.unet, sldm.vae, sldm.conditioner):
        module.requires_grad_(False)
    return sldm


def bench_tiny(num_images, views, steps, batch_sizes):
    print(f"== tiny random S-LDM on this CPU ({torch.get_num_threads()} threads): {num_images} images, M = {views}, "
          f"{steps} DDIM steps, guidance {gv.PAPER_GUIDANCE}")
    print(f"{'batch':>6}{'UNet calls':>12}{'calls/img':>11}{'UNet evals/img':>16}{'images/s':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gv.save_sldm(tmp / "model", tiny_sldm())
        rng = np.random.default_rng(0)
        for i in range(num_images):
            path = tmp / "images" / f"c{i % 2}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(path)
        rel = gv.list_images(tmp / "images")
        for batch in batch_sizes:
            backend = gv.SLDMBackend(gv.load_sldm(tmp / "model"), steps=steps)
            rows = []
            backend.sldm.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
            s = gv.generate_bags(backend, tmp / "images", rel, tmp / f"bags{batch}", views, batch_size=batch,
                                 workers=0, progress=False)
            print(f"{batch:>6}{s['unet_calls']:>12}{s['unet_calls'] / num_images:>11.2f}"
                  f"{sum(rows) / num_images:>16.0f}{s['generated'] / s['seconds']:>10.2f}")


def count_macs(model, *inputs, **kwargs):
    """Multiply-accumulates of one forward: Conv2d, Linear, and the two attention products
    (QK^T and AV) of diffusers' Attention and cdgmae's Attention. Returns (MACs, seconds)."""
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    total = [0]

    def conv(m, args, out):
        total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, args, out):
        total[0] += out.numel() * m.in_features

    def diffusers_attention(m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        lq = x.shape[2] * x.shape[3] if x.ndim == 4 else x.shape[1]
        ctx = kwargs.get("encoder_hidden_states")
        lk = lq if ctx is None else ctx.shape[1]
        total[0] += 2 * x.shape[0] * lq * lk * m.inner_dim

    def vit_attention(m, args, out):
        B, L, D = args[0].shape
        total[0] += 2 * B * L * L * D

    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv))
        elif isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(linear))
        elif isinstance(mod, DiffusersAttention):
            hooks.append(mod.register_forward_hook(diffusers_attention, with_kwargs=True))
        elif isinstance(mod, cdgmae.Attention):
            hooks.append(mod.register_forward_hook(vit_attention))
    start = time.time()
    with torch.no_grad():
        model(*inputs, **kwargs)
    seconds = time.time() - start
    for h in hooks:
        h.remove()
    return total[0], seconds


def bench_real_size(views, steps):
    from diffusers import UNet2DConditionModel

    print("\n== S-LDM of the real size, random weights: MACs of one forward (batch 1), counted with hooks")
    unet = UNet2DConditionModel(**gv.ldm_unet_config(REAL_SIZE_CONFIG)).eval()
    params = sum(p.numel() for p in unet.parameters())
    unet_macs, unet_s = count_macs(unet, torch.randn(1, 3, 64, 64), 500, encoder_hidden_states=torch.randn(1, 1, 512))
    vae = gv.ldm_first_stage(REAL_SIZE_CONFIG, {}).eval()
    dec_macs, dec_s = count_macs(Decode(vae), torch.randn(1, 3, 64, 64))
    vit = cdgmae.vit_base(patch_size=16).eval()
    vit_macs, vit_s = count_macs(vit, torch.randn(1, 3, 224, 224))
    print(f"UNet (LDM-cin256-v2, {params / 1e6:.0f} M params, 64x64x3 latents): {unet_macs / 1e9:.1f} GMACs "
          f"({unet_s:.1f} s on this CPU, fp32)")
    print(f"VQ-f4 decoder (to 256x256):                      {dec_macs / 1e9:.1f} GMACs ({dec_s:.1f} s)")
    print(f"DINO ViT-B/16 conditioner (224x224):             {vit_macs / 1e9:.1f} GMACs ({vit_s:.1f} s)")
    evals = 2 * steps * views
    per_image = evals * unet_macs + views * dec_macs + vit_macs
    flops = 2 * per_image  # 1 MAC = 2 FLOPs, as GPU peak figures count them
    print(f"per real image: {evals} UNet evaluations (2 branches x {steps} steps x M = {views}) + {views} decodes "
          f"+ 1 ViT = {per_image / 1e12:.2f} TMACs = {flops / 1e12:.1f} TFLOP")
    print(f"at A100 bf16 dense peak ({A100_BF16_PEAK / 1e12:.0f} TFLOP/s): >= {flops / A100_BF16_PEAK:.3f} GPU-s per "
          f"image, <= {A100_BF16_PEAK / flops:.1f} images/s per GPU (a bound, not a measurement)")
    achieved = flops / PAPER_GPU_SECONDS_PER_IMAGE
    print(f"paper: 48 h x 8 A100 / 1.28M images = {PAPER_GPU_SECONDS_PER_IMAGE:.2f} GPU-s per image "
          f"({1 / PAPER_GPU_SECONDS_PER_IMAGE:.2f} images/s per GPU; 135 ms per image on 8 GPUs), i.e. "
          f"{achieved / 1e12:.0f} TFLOP/s = {100 * achieved / A100_BF16_PEAK:.0f}% of peak if the model is this size")


class Decode(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8, help="real images in the tiny-model run")
    p.add_argument("--views", type=int, default=gv.PAPER_VIEWS)
    p.add_argument("--steps", type=int, default=gv.PAPER_STEPS)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="real images per UNet call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-real-size", action=argparse.BooleanOptionalAction, default=False)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench_tiny(args.images, args.views, args.steps, args.batch_sizes)
    if not args.skip_real_size:
        bench_real_size(args.views, args.steps)


if __name__ == "__main__":
    main()
