"""Bags of views from an image-conditioned latent diffusion model (CDG-MAE, Sec. 3.1 and 4).

For every real image, M views are sampled from a self-supervised latent diffusion model
(S-LDM): a UNet whose cross-attention context is the projected embedding of the real image
by a frozen self-supervised ViT. The real image and its M views form the image's *bag of
views*, written offline in the layout that `cdgmae.py` trains on:

    BAGS/<relative folder of the real image>/<image stem>/
        view_00.jpg ... view_{M-1}.jpg    the generated views (JPEG, quality 95)
        real.<original suffix, lowercased> the real image, its original bytes
    BAGS/generation.json                   the settings and model fingerprint the bags were made with
    BAGS/unreadable-shard*.txt             input images that could not be decoded (skipped)

Sampling follows the paper (Sec. 4, after Gen-SIS): 50 DDIM steps (eta = 0) and "a
classifier-free guidance weight of 6 [18]", the unconditional branch being the projection of
a zero embedding. [18] is Ho & Salimans, whose guided noise with weight w is

    eps = (1 + w) eps_cond - w eps_uncond      w = 0: conditional, w = -1: unconditional

and the same lab's public diffusion code (Large-Image-Diffusion) computes
`(1 + guidance) * cond_out - guidance * uncond_out`. So for the S-LDM, `--guidance w` is that w,
default 6: eps_uncond + 7 (eps_cond - eps_uncond). The image-variation pipeline keeps diffusers'
own convention, which its code defines: `--guidance s` is its guidance_scale,
eps_uncond + s (eps_cond - eps_uncond), the conditional prediction alone for s <= 1; its
default s = 7 is the paper's w = 6. generation.json records which convention a bag root's
`guidance` is in.

What you may copy: the method comes first, in its order: `Conditioner` (Sec. 3.1; any ViT
with `forward_features` and `embed_dim`), the `SLDM`, the sampling of Sec. 4
(`guided_noise_prediction`, `sample_latents`, `decode_latents`, `view_noise`: torch and
diffusers' UNet2DConditionModel, DDIMScheduler, VQModel / AutoencoderKL, or objects with the
same calls) and the bags on disk (`SLDMBackend`, `generate_bags`, `write_bag`). Then the S-LDM
folder, the CompVis-LDM converter (pyyaml and the two public layouts, mapped here), the
image-variation backend (transformers), inputs and shards, the settings record, k-NN bags and
the command line. The plumbing comes from common.py; from cdgmae.py only
`encoder_from_checkpoint`, `load_checkpoint` and `check_finite`; from metrics.py the
conditioning crop and the k-NN search.

Commands:
    # a CompVis-LDM checkpoint (UNet + VQ/KL first stage + Linear projection) -> S-LDM folder
    python generate_views.py convert --ldm-checkpoint model.ckpt --ldm-config model.yaml \\
        --dino dino_vitbase16_pretrain.pth --output sldm/
    # k-NN image bags (Table 2, last row): each image with its 5 nearest images by MAE cls embedding
    python generate_views.py knn --images train/ --checkpoint mae_pretrain_vit_base.pth --output knn-bags/
    # views of an ImageNet-layout tree, 8 GPUs (or --shard i/n for array jobs)
    torchrun --nproc_per_node 8 generate_views.py --images train/ --model sldm/ --output bags/ --views 4

Import:
    from generate_views import load_sldm, SLDMBackend, generate_bags
"""
import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from PIL import Image
from tqdm import tqdm

import cdgmae
import metrics
from common import (IMAGE_SUFFIXES, VIEW_NAME, InputError, atomic_write, bag_files, check_new_folder,
                    check_output_folder, check_outside, checked, claim_record, file_sha256, folder_sha256,
                    load_rgb, one_line, raise_error, read_record, refuse_line_breaks, refuse_other_settings,
                    remove_stale_temporaries, run_command, torchrun_environment, write_failure)

PAPER_VIEWS = 4          # M (Sec. 4)
PAPER_STEPS = 50         # DDIM steps (Sec. 4)
PAPER_GUIDANCE = 6.0     # classifier-free guidance weight w (Sec. 4, Ho & Salimans: (1 + w) eps_c - w eps_u)
# --guidance per backend: the convention its value is in (recorded in generation.json) and its
# default; both defaults give the paper's guided noise, eps_u + 7 (eps_c - eps_u). Ranges: the
# S-LDM's w >= -1 (w = -1 is the unconditional prediction, a control: views that know nothing of
# their image; below it the guidance pushes views away from their image); the pipeline's s >= 1
# (diffusers guides only for s > 1 and samples conditionally for every s <= 1, so below 1 the
# value would not mean the formula: check_image_variation).
GUIDANCE_CONVENTION = {"sldm": "(1 + w) eps_c - w eps_u",
                       "sd-image-variation": "eps_u + s (eps_c - eps_u), eps_c alone for s <= 1"}
GUIDANCE_DEFAULT = {"sldm": PAPER_GUIDANCE, "sd-image-variation": 1 + PAPER_GUIDANCE}
JPEG_QUALITY = 95
SLDM_FORMAT = "cdgmae-sldm"

# The LDM noise schedule ("linear" in CompVis terms is linear in sqrt(beta): diffusers'
# "scaled_linear") and the DDIM discretisation of the CompVis sampler: timesteps
# range(0, 1000, 1000 // S) + 1, final alpha_bar_prev = alpha_bar[0], no clipping.
LDM_DDIM = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                prediction_type="epsilon")


# -----------------------------------------------------------------------------
# The conditioning network: frozen SSL ViT + Linear projection
# -----------------------------------------------------------------------------

class Conditioner(nn.Module):
    """Real image -> the UNet's cross-attention context (Sec. 3.1).

    The frozen self-supervised ViT (DINO ViT-B/16 for the lab's S-LDMs) embeds the image as
    its cls token after the final norm, [B, E]; with `normalize` the embedding is
    L2-normalised (the `normalize_ssl` option of the CompVis config), then a Linear layer
    projects it to the UNet's cross-attention width: context [B, 1, D]. The unconditional
    context of classifier-free guidance is the projection of a zero embedding, as in
    training, where the embedding was replaced by zeros with probability p_uncond.
    """

    def __init__(self, vit, context_dim, normalize=True, image_size=224):
        super().__init__()
        self.vit = vit
        self.projection = nn.Linear(vit.embed_dim, context_dim)
        self.normalize = normalize
        self.image_size = image_size

    def embed(self, images):
        """images [B, 3, S, S] (ImageNet-normalised) -> cls embedding [B, E]."""
        return self.vit.forward_features(images)[:, 0]

    def project(self, embedding):
        """embedding [B, E] -> context [B, 1, D]. A zero embedding stays zero under the normalisation."""
        if self.normalize:
            embedding = F.normalize(embedding, dim=-1)
        return self.projection(embedding).unsqueeze(1)

    def forward(self, images):
        return self.project(self.embed(images))

    def unconditional(self):
        """The context of the unconditional branch, [1, 1, D]."""
        return self.project(torch.zeros(1, self.vit.embed_dim, device=self.projection.weight.device))


def conditioning_tensor(img, size=224):
    """PIL RGB -> [3, size, size]: shorter side resized to `size` (bicubic), centre crop,
    ImageNet normalisation (metrics.evaluation_tensor's crop). An assumption: the S-LDM papers
    do not state their transform."""
    return metrics.evaluation_tensor(img, size, center_crop=True)


# -----------------------------------------------------------------------------
# The S-LDM: UNet, first stage (VQ or KL autoencoder), DDIM scheduler and conditioner
# -----------------------------------------------------------------------------

@dataclass
class SLDM:
    unet: nn.Module
    vae: nn.Module
    scheduler: object
    conditioner: Conditioner

    def latent_shape(self):
        """(C, h, w) of the UNet's latents."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, *size)


# -----------------------------------------------------------------------------
# Sampling (Sec. 4: 50 DDIM steps, classifier-free guidance)
# -----------------------------------------------------------------------------

def guided_noise_prediction(unet, latents, t, context, uncond_context, guidance):
    """Classifier-free guidance of weight w = `guidance` as Ho & Salimans (the paper's [18]) write it:
    (1 + w) eps_c - w eps_u (w = 0: conditional, w = -1: unconditional), both branches in ONE UNet call.

    latents [N, C, h, w], context [N, 1, D], uncond_context [1, 1, D] -> eps [N, C, h, w] (float32).
    """
    n = latents.shape[0]
    x = torch.cat([latents, latents]).to(unet.dtype)
    ctx = torch.cat([context, uncond_context.expand(n, -1, -1)]).to(unet.dtype)
    eps_cond, eps_uncond = unet(x, t, encoder_hidden_states=ctx).sample.float().chunk(2)
    return (1 + guidance) * eps_cond - guidance * eps_uncond


@torch.no_grad()
def sample_latents(unet, scheduler, noise, context, uncond_context, guidance=PAPER_GUIDANCE, steps=PAPER_STEPS):
    """DDIM (eta = 0) from `noise` [N, C, h, w] with contexts [N, 1, D] -> latents [N, C, h, w].
    One UNet call per step: N samples x 2 guidance branches."""
    if steps < 1:  # zero steps would return the initial noise as if it were a sample
        raise ValueError(f"steps {steps}: DDIM needs at least one step")
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = guided_noise_prediction(unet, scheduler.scale_model_input(latents, t), t, context, uncond_context,
                                      guidance)
        latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
    return latents


@torch.no_grad()
def decode_latents(vae, latents):
    """latents [N, C, h, w] -> uint8 images [N, H, W, 3]. A VQ first stage quantises first, as LDM does."""
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def view_seed(seed, rel_path, view_index):
    """63-bit seed of one view: a hash of (seed, the image's relative path, the view index), so that
    a view does not depend on the batch, the shard, the number of views asked or the machine."""
    digest = hashlib.sha256(f"{seed}:{rel_path}:{view_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def view_noise(seed, rel_path, num_views, shape):
    """Initial latents of the M views of one image: [M, *shape], float32, drawn on the CPU."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(view_seed(seed, rel_path, k)))
                        for k in range(num_views)])


class SLDMBackend:
    """Views from an S-LDM (an SLDM, e.g. load_sldm's). `prepare` runs in the data-loading workers."""

    def __init__(self, sldm, steps=PAPER_STEPS, guidance=PAPER_GUIDANCE):
        self.sldm, self.steps, self.guidance = sldm, steps, guidance
        self.device = sldm.unet.device
        self.unet_calls = 0
        sldm.unet.register_forward_pre_hook(self._count_call)
        self.prepare = partial(conditioning_tensor, size=sldm.conditioner.image_size)

    def _count_call(self, module, inputs):
        self.unet_calls += 1

    def latent_shape(self):
        return self.sldm.latent_shape()

    @torch.no_grad()
    def generate(self, prepared, noise):
        """prepared: B conditioning tensors [3, S, S]; noise [B, M, C, h, w] -> B lists of M PIL images."""
        B, M = noise.shape[:2]
        context = self.sldm.conditioner(torch.stack(prepared).to(self.device))        # [B, 1, D]
        context = context.repeat_interleave(M, dim=0)                                   # [B*M, 1, D], image-major
        uncond = self.sldm.conditioner.unconditional()
        latents = sample_latents(self.sldm.unet, self.sldm.scheduler, noise.flatten(0, 1).to(self.device),
                                 context, uncond, self.guidance, self.steps)
        images = decode_latents(self.sldm.vae, latents).numpy()
        return [[Image.fromarray(images[b * M + k]) for k in range(M)] for b in range(B)]


# -----------------------------------------------------------------------------
# Bags of views on disk (the layout in the docstring)
# -----------------------------------------------------------------------------

def bag_name(rel_path):
    """Relative bag folder of an image: its folder / its stem (Sec. 3.1 layout in cdgmae.py)."""
    p = Path(rel_path)
    return (p.parent / p.stem).as_posix()


def bag_is_complete(bag_dir, num_views):
    """True when the bag holds real.* and view_00 .. view_{M-1}."""
    if not os.path.isdir(bag_dir):
        return False
    real, views = bag_files(bag_dir)
    indices = {int(VIEW_NAME.match(os.path.basename(v)).group(1)) for v in views}
    return real is not None and indices >= set(range(num_views))


def write_bag(bag_dir, real_path, views, quality=JPEG_QUALITY, link=False):
    """Write one bag: the views first, the real image last, each under a hidden temporary
    name then renamed. A bag folder holding real.* (what common.find_bags looks for) is
    therefore always complete, and a killed run never leaves a truncated file under a final name.

    views: PIL images (saved as view_XX.jpg) or image files (view_XX.<their suffix>, e.g. the
    k-NN images). link: files (views and the real image) are hard-linked where the filesystem
    allows it, else copied."""
    bag_dir = Path(bag_dir)
    bag_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(bag_dir)   # left by a run killed while writing this bag
    for k, view in enumerate(views):
        if isinstance(view, Image.Image):
            atomic_write(bag_dir / f"view_{k:02d}.jpg",
                                lambda tmp: view.save(tmp, format="JPEG", quality=quality))
        else:
            atomic_write(bag_dir / f"view_{k:02d}{Path(view).suffix.lower()}",
                                partial(place_file, view, link=link))
    real_name = "real" + Path(real_path).suffix.lower()
    atomic_write(bag_dir / real_name, partial(place_file, real_path, link=link))


def place_file(source, destination, link=False):
    """Copy `source` to `destination`, or hard-link it when `link` and the filesystem allows it
    (same filesystem, links supported)."""
    if link:
        try:
            os.link(source, destination)
            return
        except OSError:  # another filesystem (EXDEV), no hard links there, too many links: copy
            pass
    shutil.copyfile(source, destination)


class ImageFiles(torch.utils.data.Dataset):
    """(index, prepared image or None, error or None): decoding runs in the DataLoader workers."""

    def __init__(self, root, rel_paths, prepare=None):
        self.root, self.rel_paths, self.prepare = Path(root), rel_paths, prepare

    def __len__(self):
        return len(self.rel_paths)

    def __getitem__(self, i):
        try:
            img = load_rgb(self.root / self.rel_paths[i])
            return i, (self.prepare(img) if self.prepare else img), None
        except Exception as e:  # noqa: BLE001 -- reported and skipped, the run goes on
            return i, None, str(e)


def generate_bags(backend, images_root, rel_paths, output, num_views=PAPER_VIEWS, batch_size=8, seed=0,
                  quality=JPEG_QUALITY, workers=4, progress=True):
    """Generate the bags of `rel_paths` (relative to images_root) under `output`, skipping complete bags.
    `backend`: any object with `prepare`, `latent_shape()`, `generate(prepared, noise)` and `unet_calls`
    (SLDMBackend, ImageVariationBackend).

    Returns a summary: {"images", "complete_before", "generated", "unreadable": [(path, reason)],
    "unet_calls", "seconds"}.
    """
    if not 1 <= num_views <= 100:
        raise ValueError(f"--views {num_views}: the layout names views view_00 .. view_99")
    start, calls_before = time.time(), backend.unet_calls
    output = Path(output)
    todo = [p for p in tqdm(rel_paths, desc="checking bags", unit="bag", disable=not progress, leave=False)
            if not bag_is_complete(output / bag_name(p), num_views)]
    summary = {"images": len(rel_paths), "complete_before": len(rel_paths) - len(todo), "generated": 0,
               "unreadable": []}
    loader = torch.utils.data.DataLoader(ImageFiles(images_root, todo, backend.prepare), batch_size=batch_size,
                                         num_workers=workers, collate_fn=list)
    shape = backend.latent_shape()
    bar = tqdm(total=len(todo), unit="img", desc="generating views", disable=not progress, dynamic_ncols=True)
    for batch in loader:
        good = []
        for i, prepared, error in batch:
            if error is None:
                good.append((i, prepared))
            else:
                summary["unreadable"].append((todo[i], error))
                tqdm.write(f"skipping {todo[i]}: {error}", file=sys.stderr)
        if good:
            noise = torch.stack([view_noise(seed, todo[i], num_views, shape) for i, _ in good])
            views = backend.generate([prepared for _, prepared in good], noise)
            for (i, _), bag_views in zip(good, views):
                write_bag(output / bag_name(todo[i]), Path(images_root) / todo[i], bag_views, quality)
            summary["generated"] += len(good)
        bar.update(len(batch))
        bar.set_postfix(unreadable=len(summary["unreadable"]))
    bar.close()
    summary["unet_calls"] = backend.unet_calls - calls_before
    summary["seconds"] = time.time() - start
    return summary


# -----------------------------------------------------------------------------
# The S-LDM folder (diffusers layout)
# -----------------------------------------------------------------------------
#
#   MODEL/sldm.json                  {"format": "cdgmae-sldm", "vae_class": "VQModel" | "AutoencoderKL",
#                                     "conditioner": {"embed_dim", "context_dim", "normalize", "image_size"}}
#   MODEL/unet/                      UNet2DConditionModel.save_pretrained (config.json + safetensors)
#   MODEL/vae/                       VQModel or AutoencoderKL.save_pretrained
#   MODEL/scheduler/                 DDIMScheduler.save_pretrained (scheduler_config.json)
#   MODEL/conditioner/vit.pth        {"model": ViT state dict (MAE/DINO keys), "args": {"num_heads": H}}
#   MODEL/conditioner/projection.pth {"weight": [D, E], "bias": [D]}

def save_sldm(folder, sldm, extra=None):
    """Write an S-LDM to `folder` in the layout above (written to a temporary sibling folder,
    then renamed, so a half-written model folder never exists under the final name)."""
    folder = Path(folder)
    check_new_folder(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    sldm.unet.save_pretrained(tmp / "unet")
    sldm.vae.save_pretrained(tmp / "vae")
    sldm.scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "conditioner").mkdir(parents=True)
    vit = sldm.conditioner.vit
    torch.save({"model": vit.state_dict(), "args": {"num_heads": vit.num_heads}}, tmp / "conditioner" / "vit.pth")
    projection = sldm.conditioner.projection
    torch.save({"weight": projection.weight.detach().cpu(), "bias": projection.bias.detach().cpu()},
               tmp / "conditioner" / "projection.pth")
    meta = {"format": SLDM_FORMAT, "vae_class": type(sldm.vae).__name__,
            "conditioner": {"embed_dim": vit.embed_dim, "context_dim": projection.out_features,
                            "normalize": sldm.conditioner.normalize, "image_size": sldm.conditioner.image_size},
            **(extra or {})}
    (tmp / "sldm.json").write_text(json.dumps(meta, indent=2) + "\n")
    if folder.exists():
        folder.rmdir()
    os.replace(tmp, folder)


SLDM_FILES = ["sldm.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", "conditioner/vit.pth",
              "conditioner/projection.pth"]


def read_sldm_meta(folder):
    """sldm.json of an S-LDM folder, checked: every piece present, the keys load_sldm reads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: model folder not found (give the folder made by `generate_views.py convert`)")
    missing = [n for n in SLDM_FILES if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: not an S-LDM folder, missing {missing} "
                                f"(make one with `python generate_views.py convert ...`)")
    try:
        meta = json.loads((folder / "sldm.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}/sldm.json: cannot read ({one_line(e)}) (re-create the folder with convert)") from e
    if not isinstance(meta, dict) or meta.get("format") != SLDM_FORMAT:
        format_ = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{folder}/sldm.json: format is {format_!r}, expected {SLDM_FORMAT!r}")
    cond_keys = {"embed_dim", "context_dim", "normalize", "image_size"}
    if not isinstance(meta.get("conditioner"), dict) or not cond_keys <= set(meta["conditioner"]):
        raise ValueError(f"{folder}/sldm.json: 'conditioner' must hold {sorted(cond_keys)} "
                         f"(re-create the folder with convert)")
    if meta.get("vae_class") not in ("VQModel", "AutoencoderKL"):
        raise ValueError(f"{folder}/sldm.json: vae_class {meta.get('vae_class')!r} is not VQModel or AutoencoderKL")
    return meta


def load_piece(path, load, what_to_do="re-create the model folder"):
    """load() of one piece of a model folder; a file that does not load, or whose weights hold NaN
    or infinite values, is a ValueError naming it."""
    try:
        piece = load()
    except InputError:  # already one line naming the file and the way out
        raise
    except (OSError, ValueError, RuntimeError) as e:  # diffusers: OSError / ValueError; torch: RuntimeError
        reason = one_line(e).removeprefix(f"{path}: ")
        raise ValueError(f"{path}: cannot load ({reason}) ({what_to_do})") from e
    if isinstance(piece, nn.Module):
        cdgmae.check_finite(piece.state_dict(), path, what_to_do)
    return piece


def load_sldm(folder, device="cpu", dtype=torch.float32):
    """Read an S-LDM folder. The UNet runs in `dtype`; the VAE and the conditioner stay in float32."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VQModel

    folder = Path(folder)
    meta = read_sldm_meta(folder)
    vae_class = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}[meta["vae_class"]]
    # No accelerate here: low_cpu_mem_usage=False makes diffusers build the modules normally.
    # use_safetensors: never fall back to unpickling a .bin.
    unet = load_piece(folder / "unet", lambda: UNet2DConditionModel.from_pretrained(
        folder / "unet", torch_dtype=dtype, low_cpu_mem_usage=False, use_safetensors=True))
    vae = load_piece(folder / "vae", lambda: vae_class.from_pretrained(
        folder / "vae", low_cpu_mem_usage=False, use_safetensors=True))
    scheduler = load_piece(folder / "scheduler", lambda: DDIMScheduler.from_pretrained(folder / "scheduler"))
    cond = meta["conditioner"]
    vit = load_piece(folder / "conditioner" / "vit.pth", lambda: cdgmae.encoder_from_checkpoint(
        str(folder / "conditioner" / "vit.pth"), img_size=cond["image_size"]))
    conditioner = Conditioner(vit, cond["context_dim"], cond["normalize"], cond["image_size"])
    projection_path = folder / "conditioner" / "projection.pth"
    load_piece(projection_path, lambda: conditioner.projection.load_state_dict(
        cdgmae.load_checkpoint(projection_path), strict=True))
    cdgmae.check_finite(conditioner.projection.state_dict(), projection_path, "re-create the model folder")
    if unet.config.cross_attention_dim != cond["context_dim"]:
        raise ValueError(f"{folder}: UNet cross_attention_dim {unet.config.cross_attention_dim} != "
                         f"projection width {cond['context_dim']}")
    sldm = SLDM(unet.to(device).eval(), vae.to(device).eval(), scheduler, conditioner.to(device).eval())
    for module in (sldm.unet, sldm.vae, sldm.conditioner):
        module.requires_grad_(False)
    return sldm


# -----------------------------------------------------------------------------
# Converting a CompVis-LDM checkpoint into an S-LDM folder
# -----------------------------------------------------------------------------
#
# The checkpoint holds three models under three prefixes. Each becomes its diffusers
# counterpart, built with its public constructor from a config derived from the yaml; its
# weights are renamed from the CompVis layout to the diffusers one and loaded strictly: every
# checkpoint key must name a tensor of the model, and every tensor of the model must be given.
#
#   model.diffusion_model.*  openaimodel.UNetModel with SpatialTransformers   -> UNet2DConditionModel
#   first_stage_model.*      VQModelInterface / AutoencoderKL (taming's        -> VQModel / AutoencoderKL
#                            Encoder and Decoder, a quantizer or not)
#   cond_stage_model.*       one Linear layer (PatchEmbedder.patch_fc)         -> Conditioner.projection
#
# A renaming table maps each CompVis module to (its diffusers module, {CompVis layer inside it:
# diffusers layer}), or None where the layers inside have the same names in both layouts.

def read_ldm_config(path):
    """The checkpoint's yaml, checked to be a CompVis LDM config."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the LDM config ({one_line(e)}) (give the checkpoint's yaml)") from e
    params = config.get("model") if isinstance(config, dict) else None
    if not isinstance(params, dict) or "unet_config" not in (params.get("params") or {}):
        raise ValueError(f"{path}: not a CompVis LDM config (model.params.unet_config missing)")
    return config


def read_ldm_checkpoint(path, trust=False):
    """Flat state dict of a CompVis/Lightning checkpoint ({"state_dict": ...} or plain)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # noqa: BLE001 -- re-raised with the file's name and the way out
        hint = "" if trust else (" -- if the file holds pickled Python objects and you trust it, "
                                 "pass --trust-checkpoint")
        raise ValueError(f"{path}: cannot read checkpoint ({one_line(e)}){hint}") from e
    while isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not any(k.startswith("model.diffusion_model.") for k in ckpt):
        raise ValueError(f"{path}: no model.diffusion_model.* keys, not a CompVis-LDM checkpoint")
    state = {k: v for k, v in ckpt.items() if torch.is_tensor(v)}
    cdgmae.check_finite(state, path, "convert a checkpoint saved before the training diverged")
    return state


def renamed(key, table):
    """A CompVis key -> its diffusers name by a renaming table; None if no module of the table holds it."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):  # the longest module first: input_blocks.3.0.op before input_blocks.3.0
        module, layer, leaf = ".".join(parts[:n]), ".".join(parts[n:-1]), parts[-1]
        if module in table:
            new_module, layers = table[module]
            if layers is not None:
                if layer not in layers:
                    return None
                layer = layers[layer]
            return ".".join(p for p in (new_module, layer, leaf) if p)
    return None


def load_converted(model, weights, table, what, name, prefix):
    """Load CompVis `weights` (their keys without `prefix`) into the diffusers `model`, every key renamed
    by `table`, strictly."""
    target, state, unconverted = model.state_dict(), {}, []
    for key, value in weights.items():
        new = renamed(key, table)
        if new not in target:
            unconverted.append(key)
        elif value.ndim == 4 and value.shape[2:] == (1, 1) and target[new].ndim == 2:
            state[new] = value[:, :, 0, 0]  # a 1x1 convolution in CompVis, the same map as a Linear layer
        else:
            state[new] = value
    if unconverted:
        raise ValueError(f"{name}: {len(unconverted)} {what} keys were not converted: "
                         f"{[prefix + k for k in sorted(unconverted)[:20]]}")
    missing = sorted(set(target) - set(state))
    if missing:
        raise ValueError(f"{name}: the model the config builds has {len(missing)} {what} tensors that the checkpoint "
                         f"lacks: {missing[:20]} (give the yaml the checkpoint was trained with)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # a shape that differs
        raise ValueError(f"{name}: {what} weights do not fit the config ({one_line(e)})") from e


# The UNet. CompVis UNetModel options that this conversion maps only at the value given (their
# default there): other values build layers that UNet2DConditionModel lays out otherwise or lacks.
UNET_FIXED_OPTIONS = {"dims": 2, "conv_resample": True, "resblock_updown": False, "num_classes": None,
                      "n_embed": None, "disable_self_attentions": None, "num_attention_blocks": None,
                      "disable_middle_self_attn": False}
# openaimodel.ResBlock -> diffusers ResnetBlock2D
RESBLOCK_LAYERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                   "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def check_ldm_unet(params, where):
    """Raise, naming the yaml, unless its UNet is one that this conversion maps."""
    p = params["unet_config"]["params"]
    if params.get("conditioning_key", "crossattn") != "crossattn":
        raise ValueError(f"{where}: conditioning_key {params['conditioning_key']!r} is not supported, only 'crossattn'")
    if not p.get("use_spatial_transformer") or not isinstance(p.get("context_dim"), int):
        raise ValueError(f"{where}: the UNet has no cross-attention to one context (use_spatial_transformer, an "
                         f"integer context_dim): not an S-LDM")
    for key, value in UNET_FIXED_OPTIONS.items():
        if p.get(key, value) != value:
            raise ValueError(f"{where}: unet_config {key}: {p[key]!r} is not supported, only {value!r}")
    for key in ("num_res_blocks", "transformer_depth"):
        if not isinstance(p.get(key, 1), int):
            raise ValueError(f"{where}: per-level {key} {p[key]!r} is not supported (one integer for every level)")
    if p.get("num_head_channels", -1) == -1 and p.get("num_heads", -1) == -1:
        raise ValueError(f"{where}: unet_config gives neither num_heads nor num_head_channels")


def ldm_unet_config(original_config, where="the LDM config"):
    """UNet2DConditionModel config of the yaml's CompVis UNetModel (model.params.unet_config.params)."""
    check_ldm_unet(original_config["model"]["params"], where)
    p = original_config["model"]["params"]["unet_config"]["params"]
    widths = [p["model_channels"] * m for m in p["channel_mult"]]                 # level i's channels
    attention = [2 ** i in p["attention_resolutions"] for i in range(len(widths))]  # level i downsamples by 2^i
    # CompVis: width // num_head_channels heads at each level if num_head_channels is set, else num_heads
    head_channels = p.get("num_head_channels", -1)
    heads = [w // head_channels for w in widths] if head_channels != -1 else p["num_heads"]
    return dict(sample_size=p["image_size"], in_channels=p["in_channels"], out_channels=p["out_channels"],
                block_out_channels=widths, layers_per_block=p["num_res_blocks"],
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
                attention_head_dim=heads,  # diffusers' name for the number of heads
                transformer_layers_per_block=p.get("transformer_depth", 1),  # blocks per SpatialTransformer
                cross_attention_dim=p["context_dim"],
                use_linear_projection=p.get("use_linear_in_transformer", False),  # proj_in/out Linear, not 1x1 conv
                resnet_time_scale_shift="scale_shift" if p.get("use_scale_shift_norm", False) else "default")


def ldm_unet_table(config):
    """The renaming table of the UNet, written from the two layouts."""
    levels, blocks = len(config["block_out_channels"]), config["layers_per_block"]
    attention = [kind.startswith("CrossAttn") for kind in config["down_block_types"]]
    table = {"time_embed.0": ("time_embedding.linear_1", None), "time_embed.2": ("time_embedding.linear_2", None),
             "input_blocks.0.0": ("conv_in", None), "out.0": ("conv_norm_out", None), "out.2": ("conv_out", None),
             # middle_block = ResBlock, SpatialTransformer, ResBlock
             "middle_block.0": ("mid_block.resnets.0", RESBLOCK_LAYERS),
             "middle_block.1": ("mid_block.attentions.0", None),
             "middle_block.2": ("mid_block.resnets.1", RESBLOCK_LAYERS)}
    # input_blocks, after conv_in: at each level `blocks` blocks [ResBlock, SpatialTransformer at attention
    # levels], then, but at the last level, one block [Downsample], whose convolution is `op`
    i = 1
    for level in range(levels):
        for j in range(blocks):
            table[f"input_blocks.{i}.0"] = (f"down_blocks.{level}.resnets.{j}", RESBLOCK_LAYERS)
            if attention[level]:
                table[f"input_blocks.{i}.1"] = (f"down_blocks.{level}.attentions.{j}", None)
            i += 1
        if level < levels - 1:
            table[f"input_blocks.{i}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", None)
            i += 1
    # output_blocks: the levels deepest first, as diffusers' up_blocks (up block u is level levels - 1 - u),
    # blocks + 1 blocks each [ResBlock, SpatialTransformer at attention levels], the last one of every level
    # but level 0 ending with an Upsample (its `conv`)
    for u in range(levels):
        level = levels - 1 - u
        for j in range(blocks + 1):
            i = u * (blocks + 1) + j
            table[f"output_blocks.{i}.0"] = (f"up_blocks.{u}.resnets.{j}", RESBLOCK_LAYERS)
            if attention[level]:
                table[f"output_blocks.{i}.1"] = (f"up_blocks.{u}.attentions.{j}", None)
        if level > 0:
            table[f"output_blocks.{i}.{2 if attention[level] else 1}.conv"] = (f"up_blocks.{u}.upsamplers.0.conv", None)
    return table


def ldm_unet_weights(state, ema, name):
    """The UNet's weights by their CompVis names (model.diffusion_model.* without the prefix); with `ema`,
    LitEma's copies of them, stored as model_ema.diffusion_model<the name without its dots>."""
    unet = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()
            if k.startswith("model.diffusion_model.")}
    if not ema:
        return unet
    ema_key = {k: "model_ema.diffusion_model" + k.replace(".", "") for k in unet}
    missing = [k for k in unet if ema_key[k] not in state]
    if missing:
        raise ValueError(f"{name}: no EMA copy (model_ema.*) of {len(missing)} UNet weights, e.g. {missing[:3]} "
                         f"(convert without --ema)")
    return {k: state[ema_key[k]] for k in unet}


def convert_ldm_unet(state, original_config, extract_ema=False, name="checkpoint", where="the LDM config"):
    from diffusers import UNet2DConditionModel

    config = ldm_unet_config(original_config, where)
    unet = UNet2DConditionModel(**config)
    load_converted(unet, ldm_unet_weights(state, extract_ema, name), ldm_unet_table(config), "UNet", name,
                   "model.diffusion_model.")
    return unet


# The first stage. taming Encoder/Decoder options that this conversion maps only at the value
# given: diffusers' encoder and decoder blocks have no attention of their own, resample with
# convolutions and end without tanh.
FIRST_STAGE_FIXED_OPTIONS = {"attn_resolutions": [], "resamp_with_conv": True, "attn_type": "vanilla",
                             "use_linear_attn": False, "tanh_out": False, "give_pre_end": False}
# taming ResnetBlock -> diffusers ResnetBlock2D; taming AttnBlock (1x1 convolutions) -> diffusers Attention
FIRST_STAGE_RESBLOCK_LAYERS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                               "nin_shortcut": "conv_shortcut"}
FIRST_STAGE_ATTENTION_LAYERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def ldm_first_stage(original_config, state, where="the LDM config"):
    """The yaml's VQ (VQModelInterface) or KL (AutoencoderKL) first stage as a diffusers VQModel or
    AutoencoderKL with random weights."""
    from diffusers import AutoencoderKL, VQModel

    params = original_config["model"]["params"]
    kind = params["first_stage_config"]["target"].rsplit(".", 1)[-1]
    p = params["first_stage_config"]["params"]
    dd = p["ddconfig"]
    for key, value in FIRST_STAGE_FIXED_OPTIONS.items():
        if dd.get(key, value) != value:
            raise ValueError(f"{where}: first stage ddconfig {key}: {dd[key]!r} is not supported, only {value!r}")
    # LatentDiffusion divides latents by scale_factor before decoding (1.0 unless scale_by_std)
    scale = state.get("scale_factor", params.get("scale_factor", 1.0))
    levels = len(dd["ch_mult"])
    config = dict(in_channels=dd["in_channels"], out_channels=dd["out_ch"], sample_size=dd["resolution"],
                  block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]], layers_per_block=dd["num_res_blocks"],
                  down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                  latent_channels=dd["z_channels"], scaling_factor=float(scale))
    if kind.startswith("VQModel"):  # the encoder gives z_channels, quant_conv maps them to the codebook's embed_dim
        if dd.get("double_z", True):
            raise ValueError(f"{where}: a VQ first stage with double_z True is not supported")
        return VQModel(**config, num_vq_embeddings=p["n_embed"], vq_embed_dim=p["embed_dim"])
    if kind == "AutoencoderKL":  # the encoder gives mean and log-variance, 2 x z_channels (double_z)
        if not dd.get("double_z", True) or p["embed_dim"] != dd["z_channels"]:
            raise ValueError(f"{where}: a KL first stage needs double_z True and embed_dim == z_channels "
                             f"(diffusers' AutoencoderKL has no other)")
        return AutoencoderKL(**config)
    raise ValueError(f"{where}: first stage {params['first_stage_config']['target']} is not supported "
                     f"(VQModelInterface or AutoencoderKL)")


def ldm_first_stage_table(config):
    """The renaming table of the first stage, written from the two layouts."""
    levels, blocks = len(config["block_out_channels"]), config["layers_per_block"]
    table = {name: (name, None) for name in ("quant_conv", "post_quant_conv", "quantize.embedding")}
    for part in ("encoder", "decoder"):
        table.update({f"{part}.conv_in": (f"{part}.conv_in", None), f"{part}.conv_out": (f"{part}.conv_out", None),
                      f"{part}.norm_out": (f"{part}.conv_norm_out", None),
                      # mid = block_1, attn_1, block_2
                      f"{part}.mid.block_1": (f"{part}.mid_block.resnets.0", FIRST_STAGE_RESBLOCK_LAYERS),
                      f"{part}.mid.attn_1": (f"{part}.mid_block.attentions.0", FIRST_STAGE_ATTENTION_LAYERS),
                      f"{part}.mid.block_2": (f"{part}.mid_block.resnets.1", FIRST_STAGE_RESBLOCK_LAYERS)})
    for level in range(levels):
        # encoder.down[level]: `blocks` ResnetBlocks, then, but at the last level, a Downsample
        for j in range(blocks):
            table[f"encoder.down.{level}.block.{j}"] = (f"encoder.down_blocks.{level}.resnets.{j}",
                                                        FIRST_STAGE_RESBLOCK_LAYERS)
        if level < levels - 1:
            table[f"encoder.down.{level}.downsample.conv"] = (f"encoder.down_blocks.{level}.downsamplers.0.conv", None)
        # decoder.up[level]: blocks + 1 ResnetBlocks, then, but at level 0, an Upsample; diffusers'
        # up_blocks run the levels deepest first
        u = levels - 1 - level
        for j in range(blocks + 1):
            table[f"decoder.up.{level}.block.{j}"] = (f"decoder.up_blocks.{u}.resnets.{j}", FIRST_STAGE_RESBLOCK_LAYERS)
        if level > 0:
            table[f"decoder.up.{level}.upsample.conv"] = (f"decoder.up_blocks.{u}.upsamplers.0.conv", None)
    return table


def convert_ldm_first_stage(state, original_config, name="checkpoint", where="the LDM config"):
    vae = ldm_first_stage(original_config, state, where)
    weights = {k.removeprefix("first_stage_model."): v for k, v in state.items()
               if k.startswith("first_stage_model.") and not k.startswith("first_stage_model.loss.")}
    load_converted(vae, weights, ldm_first_stage_table(vae.config), "first-stage", name, "first_stage_model.")
    return vae


def convert_ldm_projection(state, original_config, name="checkpoint"):
    """(weight [D, E], bias [D], normalize) of the cond_stage_model's single Linear layer
    (Large-Image-Diffusion's PatchEmbedder: cond_stage_model.patch_fc)."""
    cond = {k[len("cond_stage_model."):]: v for k, v in state.items() if k.startswith("cond_stage_model.")}
    weights = [k for k, v in cond.items() if k.endswith("weight") and v.ndim == 2]
    if len(weights) != 1 or len(cond) != 2 or weights[0][:-len("weight")] + "bias" not in cond:
        raise ValueError(f"{name}: expected the cond_stage_model to be one Linear layer (weight + bias), "
                         f"found keys {sorted(cond)}")
    prefix = weights[0][:-len("weight")]
    cond_params = (original_config["model"]["params"].get("cond_stage_config") or {}).get("params") or {}
    return cond[prefix + "weight"], cond[prefix + "bias"], bool(cond_params.get("normalize_ssl", False))


PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}  # CompVis parameterization -> diffusers


def ldm_scheduler(original_config, where="the LDM config"):
    """DDIMScheduler reproducing the CompVis DDIM sampler (eta = 0) on the checkpoint's noise schedule."""
    from diffusers import DDIMScheduler

    params = original_config["model"]["params"]
    if params.get("beta_schedule", "linear") != "linear":
        raise ValueError(f"{where}: beta_schedule {params['beta_schedule']!r} is not supported, only CompVis 'linear'")
    if params.get("parameterization", "eps") not in PREDICTION_TYPES:
        raise ValueError(f"{where}: parameterization {params['parameterization']!r} is not one of "
                         f"{list(PREDICTION_TYPES)}")
    prediction = PREDICTION_TYPES[params.get("parameterization", "eps")]
    # CompVis DDPM defaults: linear_start 1e-4, linear_end 2e-2, 1000 timesteps.
    return DDIMScheduler(**{**LDM_DDIM, "num_train_timesteps": params.get("timesteps", 1000),
                            "beta_start": params.get("linear_start", 1e-4), "beta_end": params.get("linear_end", 2e-2),
                            "prediction_type": prediction})


def convert_ldm(ldm_checkpoint, ldm_config, dino_checkpoint, output, cond_image_size=224,
                extract_ema=False, trust_checkpoint=False, num_heads=None):
    """CompVis-LDM checkpoint + its yaml + the conditioning ViT's checkpoint -> S-LDM folder.
    num_heads: the ViT's heads (None: cdgmae.encoder_from_checkpoint's rule)."""
    check_new_folder(output)
    original_config = read_ldm_config(ldm_config)
    state = read_ldm_checkpoint(ldm_checkpoint, trust=trust_checkpoint)
    name = str(ldm_checkpoint)
    try:
        unet = convert_ldm_unet(state, original_config, extract_ema, name, ldm_config)
        vae = convert_ldm_first_stage(state, original_config, name, ldm_config)
        weight, bias, normalize = convert_ldm_projection(state, original_config, name)
        scheduler = ldm_scheduler(original_config, ldm_config)
    except KeyError as e:  # an entry the conversion needs is not in the yaml
        raise ValueError(f"{ldm_config}: missing entry {e} in this config or in {ldm_checkpoint} "
                         f"(give the yaml the checkpoint was trained with)") from e
    vit = load_piece(dino_checkpoint, lambda: cdgmae.encoder_from_checkpoint(
        str(dino_checkpoint), img_size=cond_image_size, num_heads=num_heads),
        "--dino takes the conditioning ViT's checkpoint file, e.g. DINO's dino_vitbase16_pretrain.pth")
    if cond_image_size % vit.patch_size:
        raise ValueError(f"--cond-image-size {cond_image_size}: not a multiple of the patch size {vit.patch_size} "
                         f"of {dino_checkpoint}")
    if weight.shape != (unet.config.cross_attention_dim, vit.embed_dim):
        raise ValueError(f"projection {tuple(weight.shape)} in {ldm_checkpoint} does not map the {vit.embed_dim}-d "
                         f"embedding of {dino_checkpoint} to the UNet's {unet.config.cross_attention_dim}-d context")
    conditioner = Conditioner(vit, weight.shape[0], normalize, cond_image_size)
    conditioner.projection.load_state_dict({"weight": weight, "bias": bias})
    sldm = SLDM(unet, vae, scheduler, conditioner)
    save_sldm(output, sldm, extra={"converted_from": {"checkpoint": str(ldm_checkpoint), "config": str(ldm_config),
                                                     "vit": str(dino_checkpoint), "ema": extract_ema}})
    return sldm


# -----------------------------------------------------------------------------
# The public image-variation model (not the paper's S-LDM): diffusers'
# StableDiffusionImageVariationPipeline folder, e.g. lambdalabs/sd-image-variations-diffusers:
#   MODEL/model_index.json, unet/, vae/ (AutoencoderKL), scheduler/ (any; replaced by DDIM below),
#   image_encoder/ (transformers CLIPVisionModelWithProjection), feature_extractor/ (CLIPImageProcessor),
#   safety_checker/ (optional)
# -----------------------------------------------------------------------------

IMAGE_VARIATION_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                         "image_encoder/config.json", "feature_extractor/preprocessor_config.json"]
# The CompVis DDIM discretisation of LDM_DDIM on the model's own noise schedule. A DDIMScheduler made
# from another scheduler's config (PNDM for the Lambda Labs weights) would otherwise take DDIM's
# default clip_sample=True and clip the predicted latents to [-1, 1].
IMAGE_VARIATION_DDIM = {k: LDM_DDIM[k] for k in ("clip_sample", "set_alpha_to_one", "steps_offset", "timestep_spacing")}


def check_image_variation(folder, guidance=GUIDANCE_DEFAULT["sd-image-variation"]):
    """Raise, naming the folder (or the flag) and the way out, unless `folder` can be loaded as a
    StableDiffusionImageVariationPipeline and `guidance` means what --guidance says. Reads no weights."""
    folder = Path(folder)
    if importlib.util.find_spec("transformers") is None:
        raise ValueError(f"{folder}: the sd-image-variation backend needs the transformers package for its CLIP "
                           f"image encoder (pip install -r requirements.txt)")
    missing = [name for name in IMAGE_VARIATION_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a StableDiffusionImageVariationPipeline folder, missing {missing} "
                                f"(download one, e.g. `hf download lambdalabs/sd-image-variations-diffusers "
                                f"--revision v2.0 --local-dir {folder}`, or write one with pipe.save_pretrained)")
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except ValueError as e:
        raise ValueError(f"{folder}/model_index.json: not JSON ({e})") from None
    pipeline_class = index.get("_class_name") if isinstance(index, dict) else None
    if pipeline_class != "StableDiffusionImageVariationPipeline":
        raise ValueError(f"{folder}/model_index.json: a {pipeline_class}, not a StableDiffusionImageVariationPipeline "
                         f"(this backend runs only that pipeline; --backend sldm runs S-LDM folders)")
    if guidance < 1:
        raise ValueError(f"--guidance {guidance}: the image-variation pipeline's guidance_scale s samples "
                         f"conditionally for any s <= 1 (pass --guidance 1 for that, or s > 1 in "
                         f"eps_u + s (eps_c - eps_u); the paper's weight 6 is s = 7)")


def clip_pixels(feature_extractor, img):
    """PIL RGB -> [3, S, S]: the pipeline's CLIPImageProcessor (resize, centre crop, CLIP normalisation)."""
    return feature_extractor(images=img, return_tensors="pt").pixel_values[0]


class ImageVariationBackend:
    """Views from a local StableDiffusionImageVariationPipeline folder (needs transformers). Context:
    the CLIP image embedding, [B, 1, 768] for the Lambda Labs weights; unconditional context: zeros.
    Sampling: DDIM (eta = 0, IMAGE_VARIATION_DDIM) and the pipeline's guidance in diffusers' own
    convention, which its code defines: guidance_scale s gives eps_u + s (eps_c - eps_u) for s > 1
    and the conditional prediction alone (one branch) for s = 1; s = 7 is the paper's weight 6.
    If the folder ships a safety checker, the pipeline blacks out the views it flags (counted in
    `flagged_views`). `prepare` (the CLIP preprocessing) runs in the data-loading workers."""

    def __init__(self, folder, device, dtype, steps=PAPER_STEPS, guidance=GUIDANCE_DEFAULT["sd-image-variation"]):
        check_image_variation(folder, guidance)
        from diffusers import DDIMScheduler, StableDiffusionImageVariationPipeline

        # Local folder only: nothing is fetched from the hub; no accelerate: low_cpu_mem_usage=False.
        self.pipe = StableDiffusionImageVariationPipeline.from_pretrained(
            Path(folder), dtype=dtype, low_cpu_mem_usage=False, local_files_only=True).to(device)
        self.pipe.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config, **IMAGE_VARIATION_DDIM)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance, self.device, self.dtype = steps, guidance, torch.device(device), dtype
        self.unet_calls = self.flagged_views = 0
        self.pipe.unet.register_forward_pre_hook(self._count_call)
        self.prepare = partial(clip_pixels, self.pipe.feature_extractor)

    def _count_call(self, module, inputs):
        self.unet_calls += 1

    def latent_shape(self):
        size = self.pipe.unet.config.sample_size
        return (self.pipe.unet.config.in_channels, size, size)

    @torch.no_grad()
    def generate(self, prepared, noise):
        """prepared: B CLIP pixel tensors [3, S, S]; noise [B, M, C, h, w] -> B lists of M PIL images.
        The pipeline repeats each embedding M times image-major, the order of noise.flatten(0, 1)."""
        B, M = noise.shape[:2]
        out = self.pipe(image=torch.stack(prepared), num_images_per_prompt=M, guidance_scale=self.guidance,
                        num_inference_steps=self.steps, eta=0.0,
                        latents=noise.flatten(0, 1).to(self.device, self.dtype), output_type="pil")
        flagged = sum(out.nsfw_content_detected or [])
        if flagged:
            self.flagged_views += flagged
            tqdm.write(f"warning: the pipeline's safety checker blacked out {flagged} of {B * M} views in this "
                       f"batch ({self.flagged_views} so far)", file=sys.stderr)
        return [out.images[b * M:(b + 1) * M] for b in range(B)]


# -----------------------------------------------------------------------------
# Inputs and shards
# -----------------------------------------------------------------------------


def list_images(root, file_list=None):
    """Sorted relative paths (POSIX strings) of the images under `root`, or of those named in
    `file_list` (one path relative to root per line). Raises before any work on bad input."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found (give the root of the real images)")
    if file_list is not None:
        lines = [line.strip() for line in read_file_list(file_list)]
        rel_paths = sorted({Path(os.path.normpath(line)).as_posix() for line in lines
                            if line and not line.startswith("#")})
        outside = [p for p in rel_paths if p.startswith(("/", "../"))]
        if outside:
            raise ValueError(f"{file_list}: paths must be relative to --images and inside it: {outside[:5]}")
        missing = [p for p in rel_paths if not (root / p).is_file()]
        if missing:
            raise FileNotFoundError(f"{file_list}: {len(missing)} listed files are not under {root}, "
                                    f"e.g. {missing[:5]}")
        wrong = [p for p in rel_paths if not p.lower().endswith(IMAGE_SUFFIXES)]
        if wrong:
            raise ValueError(f"{file_list}: not image files ({IMAGE_SUFFIXES}): {wrong[:5]}")
    else:
        rel_paths = []
        for dirpath, dirnames, filenames in os.walk(root, onerror=raise_error):  # never skip a folder silently
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = Path(dirpath).relative_to(root)
            rel_paths += [(rel_dir / f).as_posix() for f in filenames
                          if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
        rel_paths.sort()
    if not rel_paths:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found (give the folder "
                         f"that holds the real images)")
    bags = {}
    for p in rel_paths:
        bags.setdefault(bag_name(p), []).append(p)
    clashes = [v for v in bags.values() if len(v) > 1]
    if clashes:
        raise ValueError(f"{root}: images that would share a bag folder (same folder and stem): {clashes[:5]}")
    refuse_line_breaks(root, rel_paths, "image")
    return rel_paths


def read_file_list(path):
    """Lines of a --file-list; a missing, unreadable or non-text file is an error naming it."""
    try:
        return Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not a text file"
        raise ValueError(f"{path}: cannot read the file list ({reason}) "
                         f"(give a text file of image paths relative to --images, one a line)") from e


def resolve_shard(shard=None, env=None):
    """(index, count) of this process's share of the work: a --shard i/n split further by the
    torchrun rank (RANK / WORLD_SIZE, checked by torchrun_environment: a ValueError names a
    variable out of range), giving shard i * world + rank of n * world."""
    index, count = shard if shard is not None else (0, 1)
    rank, world, _ = torchrun_environment(env)
    return index * world + rank, count * world


def shard_items(items, index, count):
    """Round-robin share of a sorted list: the shards 0..count-1 are disjoint and cover it."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} does not exist")
    return items[index::count]


# -----------------------------------------------------------------------------
# The output's settings record: OUTPUT/generation.json
# -----------------------------------------------------------------------------
#
# Every setting that changes a bag's pixels is recorded with the first bag, and a later
# run (a resume, another shard, another torchrun node) adds bags only with the same
# settings, so one bag root never mixes two models, seeds or guidance weights. Not
# recorded: what only selects images or schedules work (--images, --file-list, --shard,
# --batch-size, --workers, --device); the device, the batch size and the CPU thread count
# change pixels only at the rounding level of float sums.

RECORD_NAME = "generation.json"
NOT_COMPARED = ("model", "checkpoint")   # where the model lies; its contents are compared by their sha256
MODEL_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".safetensors", ".bin", ".pth", ".pt", ".ckpt")
PRECISION_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def generation_settings(args, model_sha256, dtype):
    """What a run's bags depend on, as recorded in OUTPUT/generation.json. `guidance_convention`
    says what `guidance` means; a record without it predates the S-LDM's (1 + w) convention (its
    guidance g then meant eps_u + g (eps_c - eps_u)) and is refused like any other difference."""
    return {"backend": args.backend, "model": str(Path(args.model).resolve()), "model_sha256": model_sha256,
            "views": args.views, "steps": args.steps, "guidance": float(args.guidance),
            "guidance_convention": GUIDANCE_CONVENTION[args.backend], "seed": args.seed,
            "jpeg_quality": args.jpeg_quality, "precision": PRECISION_NAMES[dtype]}


def check_output(output, settings):
    """Raise ValueError (one line) if `output` holds bags made with other settings, or files
    but no record. A fresh or missing folder, or a record equal to `settings`, passes."""
    output = Path(output)
    record = output / RECORD_NAME
    check_output_folder(output)
    if not record.exists():
        if output.is_dir() and any(not e.name.startswith(".") for e in os.scandir(output)):
            raise ValueError(f"{output}: holds files but no {RECORD_NAME}, so the settings of its bags are unknown "
                             f"(give another --output, or an empty one)")
        return
    refuse_other_settings(record, read_record(record), settings, **record_rules(settings))


def record_rules(settings):
    """How generation.json is compared: every key but where the model lies (its contents are
    compared by their sha256), and the way out a message gives."""
    rules = dict(ignore=NOT_COMPARED, made="the bags here were made",
                 what_to_do="give another --output, or rerun with the recorded settings")
    if "guidance_convention" in settings:
        rules["what_to_do"] = ("give another --output, or rerun with the recorded settings; a record without "
                               "guidance_convention is of S-LDM bags whose guidance g meant eps_u + g (eps_c - eps_u), "
                               "which is --guidance g - 1 now")
    return rules


def claim_output(output, settings):
    """Create `output` and its settings record, or check the one there (common.claim_record: of
    two processes that start on a fresh folder with different settings, the second one stops)."""
    Path(output).mkdir(parents=True, exist_ok=True)
    claim_record(Path(output) / RECORD_NAME, settings, **record_rules(settings))


# -----------------------------------------------------------------------------
# k-NN image bags (Table 2, last row)
# -----------------------------------------------------------------------------
#
# The pretext data of Table 2's "K-nn images" row: the bag of a real image holds its k = 5
# nearest OTHER images of the dataset by cosine similarity of a ViT's cls embedding (the
# paper: MAE ViT-B/16), nearest first, in the layout above, so that cdgmae.py trains on them
# as it does on generated views:
#
#   BAGS/<relative folder>/<stem>/view_00.<ext> ... view_{k-1}.<ext>   the neighbours (hard links or copies)
#                                 real.<ext>                          the image itself
#   BAGS/generation.json       the settings (ViT sha256, k, crop size, listing)
#   BAGS/.knn/embeddings-XXXXX.npy   float16 [n, D] cls embeddings of KNN_SHARD images of the listing
#   BAGS/.knn/neighbours-XXXXX.npy   int64 [n, k] their neighbours' indices into the listing
#
# Three phases, each resumable: embeddings (a saved shard is never recomputed), the search
# (a saved neighbour shard is never searched again) and the bags (complete bags are skipped).

KNN_FOLDER = ".knn"
KNN_SHARD = 16384   # images per embedding / neighbour file: 24 MiB of float16 ViT-B embeddings
PAPER_KNN = 5       # k (Table 2; Table 1's k-NN pairs use the same k)


def knn_settings(args, checkpoint_sha256, rel_paths):
    """What k-NN bags depend on, as recorded in OUTPUT/generation.json: the ViT's bytes, k, the
    crop size and the listing (every image is a candidate neighbour of every other)."""
    return {"pretext": "knn", "checkpoint": str(Path(args.checkpoint).resolve()),
            "checkpoint_sha256": checkpoint_sha256, "k": args.k, "input_size": args.input_size,
            **({"num_heads": args.num_heads} if args.num_heads else {}),  # recorded when given only
            "images": len(rel_paths), "images_sha256": hashlib.sha256("\n".join(rel_paths).encode()).hexdigest()}


def shard_file(folder, kind, index):
    return Path(folder) / f"{kind}-{index:05d}.npy"


def save_array(path, array):
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, array)
    atomic_write(path, write)


def load_shard(path, rows):
    array = np.load(path)
    if array.shape[0] != rows:
        raise ValueError(f"{path}: holds {array.shape[0]} rows, expected {rows} (delete it, the rerun recomputes it)")
    return torch.from_numpy(array)


def knn_embeddings(vit, images_root, rel_paths, folder, input_size=224, batch_size=64, workers=4, device="cpu",
                   progress=True):
    """cls embeddings [N, D] (float16, CPU) of the images, KNN_SHARD at a time, with metrics'
    evaluation crop (shorter side to input_size, centre crop, ImageNet normalisation); each
    shard is saved as it is finished, and a shard already saved is read back, not recomputed."""
    shards = []
    starts = range(0, len(rel_paths), KNN_SHARD)
    for index, start in enumerate(tqdm(starts, desc="k-NN embeddings", unit="shard", disable=not progress)):
        path, paths = shard_file(folder, "embeddings", index), rel_paths[start:start + KNN_SHARD]
        if not path.exists():
            cls = metrics.cls_features(vit, [Path(images_root) / p for p in paths], input_size, True, batch_size,
                                       workers, device)
            save_array(path, cls.half().numpy())
        shards.append(load_shard(path, len(paths)))
    return torch.cat(shards)


def knn_search(embeddings, k, folder, chunk=4096, device="cpu", progress=True):
    """Indices [N, k] of every image's k nearest other images (nearest first), KNN_SHARD queries
    at a time against all N with metrics.nearest_neighbours on `device` (chunked products,
    running top-k); each shard is saved, and a shard already saved is read back."""
    features, shards = None, []
    starts = range(0, len(embeddings), KNN_SHARD)
    for index, start in enumerate(tqdm(starts, desc="k-NN search", unit="shard", disable=not progress)):
        path, queries = shard_file(folder, "neighbours", index), torch.arange(start, min(start + KNN_SHARD,
                                                                                         len(embeddings)))
        if not path.exists():
            if features is None:
                features = embeddings.to(device)
            save_array(path, metrics.nearest_neighbours(features, k, queries, chunk).cpu().numpy())
        shards.append(load_shard(path, len(queries)))
    return torch.cat(shards)


def write_knn_bags(images_root, rel_paths, neighbours, output, progress=True):
    """The bag of every image: real.<ext> the image, view_00 .. view_{k-1} its neighbours
    (neighbours [N, k], indices into rel_paths, nearest first), hard-linked where possible.
    Complete bags are skipped. Returns (bags written, bags complete before)."""
    root, output, written = Path(images_root), Path(output), 0
    for i, rel in enumerate(tqdm(rel_paths, desc="k-NN bags", unit="bag", disable=not progress)):
        bag = output / bag_name(rel)
        if not bag_is_complete(bag, neighbours.shape[1]):
            write_bag(bag, root / rel, [root / rel_paths[j] for j in neighbours[i].tolist()], link=True)
            written += 1
    return written, len(rel_paths) - written


def prepare_knn(args):
    """Every check of a k-NN run before its work: inputs, ViT, device, the output's settings, the
    images still to embed. Returns (relative image paths, ViT on the device, device, .knn folder)."""
    output = Path(args.output).resolve()
    check_outside(args.output, args.images, "--output", "--images")
    rel_paths = list_images(args.images, args.file_list)
    if len(rel_paths) <= args.k:
        raise ValueError(f"{args.images}: {len(rel_paths)} images, a bag of k = {args.k} other images needs more "
                         f"(give more images or a lower --k)")
    device, _ = pick_device_and_dtype(args.device, "fp32")
    vit = metrics.load_vit(args.checkpoint, args.input_size, args.num_heads)
    settings = knn_settings(args, file_sha256(args.checkpoint), rel_paths)
    check_output(output, settings)
    folder = output / KNN_FOLDER
    todo = [Path(args.images) / p for index, start in enumerate(range(0, len(rel_paths), KNN_SHARD))
            if not shard_file(folder, "embeddings", index).exists() for p in rel_paths[start:start + KNN_SHARD]]
    metrics.check_images_decode(todo)  # a bad image stops the run before any embedding is saved
    claim_output(output, settings)
    folder.mkdir(exist_ok=True)
    remove_stale_temporaries(folder)
    return rel_paths, vit.to(device).eval(), device, folder


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

def parse_shard(text):
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not i/n, e.g. 3/16") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text!r}: needs 0 <= i < n")
    return index, count


def add_image_arguments(p):
    """--images and --file-list, the input of both the generation and the k-NN command."""
    p.add_argument("--images", required=True, help="root of the real images (e.g. ImageNet train/, any depth)")
    p.add_argument("--file-list", default=None, help="text file of image paths relative to --images, one a line; "
                                                      "without it, every image under --images")


def get_args_parser():
    p = argparse.ArgumentParser(
        description="Generate bags of views (CDG-MAE Sec. 3.1): M views per real image from an S-LDM, "
                    "written as OUTPUT/<folder>/<stem>/{view_00.jpg ..., real.<ext>}. Resumable (complete bags "
                    "are skipped), sharded across torchrun ranks and/or --shard i/n. To build the S-LDM folder "
                    "from a CompVis-LDM checkpoint, see `python generate_views.py convert --help`; for bags of k-NN "
                    "images (Table 2), `python generate_views.py knn --help`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_image_arguments(p)
    p.add_argument("--model", required=True, help="S-LDM folder (or a diffusers pipeline folder for "
                                                  "--backend sd-image-variation)")
    p.add_argument("--backend", choices=["sldm", "sd-image-variation"], default="sldm",
                   help="sldm: the folder made by `convert`; sd-image-variation: "
                        "StableDiffusionImageVariationPipeline (needs transformers)")
    p.add_argument("--output", required=True, help="bag root to write")
    p.add_argument("--views", type=checked(int, 1, 100), default=PAPER_VIEWS,
                   help="M generated views per real image (1..100: view_00 .. view_99)")
    p.add_argument("--steps", type=checked(int, 1), default=PAPER_STEPS,
                   help="DDIM steps (eta = 0); at most the model's training timesteps")
    p.add_argument("--guidance", type=checked(float, -1), default=None,
                   help="classifier-free guidance weight. sldm: Ho & Salimans' w (the paper's [18]) in "
                        "(1 + w) eps_c - w eps_u, w >= -1 (0: conditional, -1: unconditional), default 6 (the "
                        "paper's); sd-image-variation: diffusers' guidance_scale s in eps_u + s (eps_c - eps_u), "
                        "s >= 1 (1: conditional), default 7 (the same guided noise as w = 6)")
    p.add_argument("--batch-size", type=checked(int, 1), default=8,
                   help="real images per UNet call (x M views x 2 branches)")
    p.add_argument("--seed", type=checked(int, 0), default=0,
                   help="global seed >= 0; each view's noise hashes (seed, path, view)")
    p.add_argument("--jpeg-quality", type=checked(int, 1, 100), default=JPEG_QUALITY,
                   help="quality of the views' JPEGs, 1..100 (libjpeg's scale; PIL advises <= 95: above it files "
                        "grow with hardly any gain)")
    p.add_argument("--shard", type=parse_shard, default=None, help="i/n: process the i-th of n round-robin shares "
                                                                   "(combined with the torchrun rank)")
    p.add_argument("--workers", type=checked(int, 0), default=4, help="image-decoding DataLoader workers")
    p.add_argument("--device", default=None, help="torch device; unset: cuda:LOCAL_RANK if CUDA is available, "
                                                  "else cpu")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="UNet precision; auto: bf16 (fp16 without bf16 support) on CUDA, fp32 on CPU")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    return p


def get_convert_parser():
    p = argparse.ArgumentParser(
        prog="generate_views.py convert",
        description="Convert a CompVis-LDM checkpoint of an S-LDM (UNet model.diffusion_model.*, VQ/KL first stage "
                    "first_stage_model.*, a Linear cond_stage_model.* projecting the SSL embedding) plus the "
                    "conditioning ViT's checkpoint into an S-LDM folder (diffusers layout) for generate_views.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ldm-checkpoint", required=True, help="CompVis/Lightning .ckpt with a state_dict")
    p.add_argument("--ldm-config", required=True, help="the checkpoint's yaml (model.params.unet_config, ...)")
    p.add_argument("--dino", required=True, help="the conditioning ViT (e.g. DINO ViT-B/16 pretrain .pth)")
    p.add_argument("--output", required=True, help="S-LDM folder to create (must not exist or be empty)")
    p.add_argument("--cond-image-size", type=checked(int, 1), default=224,
                   help="input size of the conditioning ViT (a multiple of its patch size)")
    p.add_argument("--num-heads", type=checked(int, 1), default=None,
                   help="attention heads of the --dino ViT (default: its checkpoint's args, else width / 64)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=False,
                   help="take the UNet's model_ema.* weights")
    p.add_argument("--trust-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="allow pickled Python objects in the .ckpt (torch.load weights_only=False)")
    return p


def get_knn_parser():
    p = argparse.ArgumentParser(
        prog="generate_views.py knn",
        description="k-NN image bags (CDG-MAE Table 2, last row): for every image under --images, a bag of its k "
                    "nearest other images by cosine similarity of a ViT's cls embedding (the paper: MAE ViT-B/16), "
                    "nearest first: OUTPUT/<folder>/<stem>/{view_00.<ext> ..., real.<ext>}, hard links where "
                    "possible. Resumable: embeddings and neighbours are saved in shards under OUTPUT/.knn, "
                    "complete bags are skipped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_image_arguments(p)
    p.add_argument("--checkpoint", required=True, help="ViT checkpoint (MAE, DINO, CropMAE or CDG-MAE)")
    p.add_argument("--output", required=True, help="bag root to write")
    p.add_argument("--k", type=checked(int, 1, 100), default=PAPER_KNN,
                   help="neighbours per image (1..100: view_00 .. view_99)")
    p.add_argument("--input-size", type=checked(int, 1), default=224,
                   help="side of the centre crop the ViT embeds, a multiple of its patch size")
    p.add_argument("--num-heads", type=checked(int, 1), default=None,
                   help="attention heads of the ViT (default: its checkpoint's args, else width / 64)")
    p.add_argument("--batch-size", type=checked(int, 1), default=64, help="images per ViT forward pass")
    p.add_argument("--chunk", type=checked(int, 1), default=4096,
                   help="rows per side of one [chunk, D] x [D, chunk] similarity product of the search")
    p.add_argument("--workers", type=checked(int, 0), default=4, help="image-decoding DataLoader workers")
    p.add_argument("--device", default=None, help="torch device; unset: cuda if available, else cpu")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    return p


def pick_device_and_dtype(device, precision):
    if device is None:
        device = f"cuda:{torchrun_environment()[2]}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device}: not a torch device ({one_line(e)})") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: {torch.cuda.device_count()} CUDA devices here (give --device cpu)")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def check_model_folder(folder, backend, guidance=None):
    """Raise (one line) if the --model folder lacks a piece the backend loads (or, for the
    pipeline, --guidance is below 1). Reads no weights."""
    if backend == "sldm":
        read_sldm_meta(folder)
    else:
        check_image_variation(folder, GUIDANCE_DEFAULT[backend] if guidance is None else guidance)


def prepare_generation(args):
    """Every check of a generation run before its work: inputs, shard, model, output settings.
    Returns (this process's image paths, shard index, shard count, backend)."""
    output = Path(args.output).resolve()
    check_outside(args.output, args.images, "--output", "--images")
    if args.guidance is None:
        args.guidance = GUIDANCE_DEFAULT[args.backend]
    rel_paths = list_images(args.images, args.file_list)
    index, count = resolve_shard(args.shard)
    mine = shard_items(rel_paths, index, count)
    device, dtype = pick_device_and_dtype(args.device, args.precision)
    check_model_folder(args.model, args.backend, args.guidance)
    settings = generation_settings(args, folder_sha256(args.model, MODEL_FILE_SUFFIXES), dtype)
    check_output(output, settings)  # a refused run has not spent the model's loading time
    if args.backend == "sldm":
        backend = SLDMBackend(load_sldm(args.model, device, dtype), args.steps, args.guidance)
        scheduler = backend.sldm.scheduler
    else:
        backend = load_piece(Path(args.model), lambda: ImageVariationBackend(args.model, device, dtype, args.steps,
                                                                             args.guidance))
        scheduler = backend.pipe.scheduler
    if args.steps > scheduler.config.num_train_timesteps:
        raise ValueError(f"--steps {args.steps}: more than the {scheduler.config.num_train_timesteps} timesteps "
                         f"{args.model} was trained with")
    claim_output(output, settings)
    print(f"shard {index}/{count}: {len(mine)} of {len(rel_paths)} images, M = {args.views} views, "
          f"{args.steps} DDIM steps, guidance {args.guidance} ({GUIDANCE_CONVENTION[args.backend]}), {device} {dtype}",
          file=sys.stderr)
    return mine, index, count, backend


def convert_command(argv):
    args = get_convert_parser().parse_args(argv)
    try:
        convert_ldm(args.ldm_checkpoint, args.ldm_config, args.dino, args.output, args.cond_image_size,
                    args.ema, args.trust_checkpoint, args.num_heads)
    except (ValueError, OSError) as e:
        raise SystemExit(one_line(e)) from None
    print(f"wrote {args.output}")


def knn_command(argv):
    args = get_knn_parser().parse_args(argv)
    try:
        rel_paths, vit, device, folder = prepare_knn(args)
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: an unreadable checkpoint
        raise SystemExit(one_line(e)) from None
    start = time.time()
    try:
        embeddings = knn_embeddings(vit, args.images, rel_paths, folder, args.input_size, args.batch_size,
                                    args.workers, device, args.progress)
        neighbours = knn_search(embeddings, args.k, folder, args.chunk, device, args.progress)
        written, complete = write_knn_bags(args.images, rel_paths, neighbours, args.output, args.progress)
    except OSError as e:  # disk full, output not writable: saved shards and complete bags stay
        raise SystemExit(write_failure(e.filename or args.output, e,
                                              then="rerun: saved shards and complete bags are kept")) from None
    except ValueError as e:  # a saved shard that does not fit the listing (load_shard)
        raise SystemExit(one_line(e)) from None
    print(f"{len(rel_paths)} images, k = {args.k}: {written} bags written, {complete} already complete "
          f"({time.time() - start:.1f} s, {device})", file=sys.stderr)
    return {"images": len(rel_paths), "written": written, "complete_before": complete}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:
        return convert_command(argv[1:])
    if argv[:1] == ["knn"]:
        return knn_command(argv[1:])
    args = get_args_parser().parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        mine, index, count, backend = prepare_generation(args)
    except (ValueError, OSError) as e:  # expected failures, each with its path and the way out
        raise SystemExit(one_line(e)) from None
    report = Path(args.output) / f"unreadable-shard{index:03d}-of-{count:03d}.txt"
    progress = args.progress and torchrun_environment()[0] == 0  # one bar: rank 0's
    try:
        summary = generate_bags(backend, args.images, mine, args.output, args.views, args.batch_size, args.seed,
                                args.jpeg_quality, args.workers, progress)
        report.unlink(missing_ok=True)  # a previous run's list, of images that may have been replaced since
        if summary["unreadable"]:  # one line per image: the reason's own line breaks are spaces
            text = "".join(f"{path}\t{' '.join(reason.split())}\n" for path, reason in summary["unreadable"])
            atomic_write(report, lambda tmp: tmp.write_text(text))
    except OSError as e:  # disk full, output not writable: the complete bags stay, a rerun resumes
        raise SystemExit(write_failure(e.filename or args.output, e,
                                              then="rerun: complete bags are kept")) from None
    rate = summary["generated"] / max(summary["seconds"], 1e-9)
    print(f"shard {index}/{count}: {summary['generated']} bags generated ({rate:.2f} images/s), "
          f"{summary['complete_before']} already complete, {len(summary['unreadable'])} unreadable images skipped",
          file=sys.stderr)
    if summary["unreadable"]:
        print(f"unreadable images listed in {report}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    run_command(main)
