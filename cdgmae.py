"""CDG-MAE: cross-view masked autoencoder pre-training on bags of diffusion-generated views.

Reference implementation of "CDG-MAE: Learning Correspondences from Diffusion Generated
Views" (Belagali et al.). The file reads top to bottom with the paper open: the method
first, in the paper's order, the plumbing after it.

  1. The model (Sec. 3.3 and 4, Eq. 4-10): the sine-cosine position embedding, the
     transformer pieces, MAE's random masking, a ViT encoder with the MAE/DINO/timm
     state-dict layout, and CDGMAE: N anchors, anchor masking, the decoder that
     cross-attends to the anchors, and the loss. Then the FLOP counter of Table 8 (A.3.1).
  2. The training data (Sec. 3.1): a sample is a target and N anchors drawn from one bag of
     views, cut with one crop box and one flip (BagDataset); then the family's other pretext
     data (Table 5): CropMAE's crops of one image, SiamMAE's frames of one video.
  3. The optimisation (Sec. 4, Table 6): the global batches, AdamW with timm's weight-decay
     groups, linear warmup and a per-iteration cosine, one epoch of steps (`train_epoch`,
     MAE's train_one_epoch), the epoch loop (`train`) and `main`.
  4. Plumbing: the run's dataset, loader and checkpoints; image decoding, cropping and
     resizing; loading MAE, DINO, CropMAE and CDG-MAE encoder checkpoints; the run folder
     and its resume checks; temporary files and atomic writes; the start-up scan of the
     data; the torchrun/DDP set-up; the command line.

What you may copy: `VisionTransformer` (with `vit_tiny` / `vit_small` / `vit_base`) and
`CDGMAE` need only torch and the definitions above them (position embeddings, transformer
pieces, `random_masking`); a CDGMAE is also a feature extractor (`forward_features`).
`count_flops` needs torch and a model with `img_size`, `num_anchors` and a forward(target,
anchors); it counts nn.Linear, nn.Conv2d and nn.LayerNorm, and the attention products of
this file's Attention and CrossAttention only. `learning_rate` needs math and an object
with lr, min_lr, warmup_epochs and epochs; `param_groups` any nn.Module;
`GlobalBatchSampler` torch. `BagDataset` (and `CropDataset`, `FrameDataset`) needs torch,
numpy and Pillow and, from this file, `bag_files`, `is_real_image`, `sample_crop_box`,
`conditioning_region`, `image_boxes` with `compose_box`, `crop_views` with
`crop_resize` (`resize_plan`, `crop_axis`, `RESAMPLING`: torch's antialiased resize ops),
`copy_flipped`, `decode_rgbx` (which maps Pillow's decoder onto a numpy array through
Pillow's internal `Image.core.map_buffer`), `read_encoded`, `batch_tensor` and
`UnreadableImage`; `decode_on_device` (--decode gpu) needs torchvision. The image rule
(`to_rgb`: any Pillow mode to 8-bit RGB, or refused; with `open_image`, `load_rgb`,
`check_image`, `gpu_decode_problem` and their mode lists) needs numpy and Pillow only. The
checkpoint loaders (`load_checkpoint`, `read_state_dict`, `encoder_from_checkpoint`,
`load_encoder_state`, with `check_finite` and `InputError`) need torch and
VisionTransformer. `checked` (argparse ranges),
`atomic_write`, `temporary_path`, `remove_stale_temporaries`, the output checks
(`check_output_folder`, `check_outside`, `refuse_line_breaks`, `write_failure`),
`torchrun_environment` and `run_command` (Ctrl-C and SIGTERM as one line) need only the
standard library. `train`, `train_epoch` and `main` tie everything together and also need tqdm.

Usage:
    python cdgmae.py --data BAGS --output runs/a1                       # one process
    torchrun --nproc_per_node 8 cdgmae.py --anchors 3 --anchor-mask 0.25  # bags in ./data/bags
    python cdgmae.py --output runs/a1 --resume auto                       # continue a run
    python cdgmae.py --count-flops --anchors 3 --anchor-mask 0.25      # Table 8 GFLOPs

Import:
    from cdgmae import CDGMAE, vit_small, vit_base
    loss, pred, mask = CDGMAE(num_anchors=3, anchor_mask_ratio=0.25)(target, anchors)
"""
import argparse
import contextlib
import datetime
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import (DIFFUSION_FOLDER_FILES, IMAGE_SUFFIXES, VIEW_NAME, InputError, UnreadableImage, bag_files, check_outside, check_output_folder, checked,
                    find_bags, first_line, image_problem, is_real_image, list_files, one_line, open_image,
                    parallel_map, plain, refuse_line_breaks, remove_stale_temporaries, run_command, to_rgb,
                    top_level_entries, torchrun_environment, write_or_exit)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -----------------------------------------------------------------------------
# Position embeddings
# -----------------------------------------------------------------------------

def sincos_pos_embed(embed_dim, grid_h, grid_w, cls_token=True):
    """Fixed 2-D sine-cosine position embedding, MAE's convention.

    The first half of the channels encodes the column (x) index, the second half the
    row (y) index; each half is [sin(pos * omega), cos(pos * omega)] with
    omega_k = 1 / 10000^(k / (D/4)). With `cls_token` a zero row is prepended.
    Returns [1 + grid_h * grid_w, D] (or [grid_h * grid_w, D]).
    """
    assert embed_dim % 4 == 0, "sin-cos embedding needs a dimension divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                            torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def encode(pos):  # [L] -> [L, D/2]
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    emb = torch.cat([encode(xs), encode(ys)], dim=1).float()
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim), emb], dim=0)
    return emb


def interpolate_pos_embed(pos_embed, grid_h, grid_w, num_prefix_tokens=1):
    """Resize a [1, P + g0*g0, D] position embedding (P prefix tokens: cls) to a new grid.

    The patch part is treated as a g0 x g0 image and resized bicubically the way DINO's
    and CropMAE's evaluation ViTs do it (the label-propagation protocol of A.1.2): with
    scale_factor (grid + 0.1) / g0 rather than an output size, which also fixes where the
    new grid samples the old one (source = (dst + 0.5) * g0 / (grid + 0.1) - 0.5). At the
    stored grid the tensor is returned unchanged.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    g0 = math.isqrt(patches.shape[1])
    if g0 * g0 != patches.shape[1]:
        raise ValueError(f"position embedding of {patches.shape[1]} patches is not a square grid")
    if (g0, g0) == (grid_h, grid_w):
        return pos_embed
    dim = patches.shape[-1]
    patches = patches.reshape(1, g0, g0, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), scale_factor=((grid_h + 0.1) / g0, (grid_w + 0.1) / g0),
                            mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


# -----------------------------------------------------------------------------
# Transformer pieces (plain modules; attention products go through the fused
# F.scaled_dot_product_attention kernel)
# -----------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Image [B, 3, H, W] -> patch tokens [B, (H/P)*(W/P), D] by a stride-P convolution (rho in Eq. 4)."""

    def __init__(self, patch_size=16, in_chans=3, embed_dim=384):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm/MAE key names)."""

    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # [B, L, D] -> [B, L, D]
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class CrossAttention(nn.Module):
    """Multi-head attention from queries x [B, Lq, D] to a memory [B, Lm, D]."""

    def __init__(self, dim, num_heads, attn_drop=0.0):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, memory):
        B, Lq, D = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, Lq, h, D // h).transpose(1, 2)
        k, v = self.kv(memory).reshape(B, memory.shape[1], 2, h, D // h).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, Lq, D))


class Mlp(nn.Module):
    """fc1 -> GELU -> (dropout) -> fc2."""

    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm ViT encoder block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """CDG-MAE decoder block (Sec. 4): cross-attention, feed-forward, self-attention.

    This is CropMAE's block, on which the paper is built: a post-norm
    `nn.TransformerDecoderLayer` with its sub-layers reordered so that the target tokens
    first read the anchors, then mix among themselves. FFN width 2048, GELU, dropout 0.1
    on attention weights, inside the FFN and on every residual branch.
    """

    def __init__(self, dim, num_heads, ffn_dim=2048, dropout=0.1):
        super().__init__()
        self.cross_attn = CrossAttention(dim, num_heads, attn_drop=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, ffn_dim, drop=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = Attention(dim, num_heads, attn_drop=dropout)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.drop = nn.Dropout(dropout)

    def init_weights(self):
        """CropMAE's init: xavier-uniform Linears (MAE's rule), zero biases, unit LayerNorms.
        CropMAE's cross-attention is an `nn.MultiheadAttention`, whose fused q/k/v in-projection
        [3D, D] gets one xavier draw (bound sqrt(6 / 4D)) that MAE's init leaves alone; here q
        is the first D rows of that draw and kv the other 2D (separate draws would give the
        wider bounds sqrt(6 / 2D) and sqrt(6 / 3D)). The self-attention's qkv is [3D, D] already."""
        self.apply(_init_linear_and_norm)
        dim = self.cross_attn.q.weight.shape[1]
        fused = nn.init.xavier_uniform_(torch.empty(3 * dim, dim))
        self.cross_attn.q.weight.data.copy_(fused[:dim])
        self.cross_attn.kv.weight.data.copy_(fused[dim:])

    def forward(self, x, memory):  # x [B, 1+L, Dd] target stream, memory [B, M, Dd] anchor tokens
        x = self.norm1(x + self.drop(self.cross_attn(x, memory)))
        x = self.norm2(x + self.drop(self.mlp(x)))
        return self.norm3(x + self.drop(self.self_attn(x)))


class CroCoDecoderBlock(nn.Module):
    """CroCo's decoder block, "CrossBlock" (CroCo Sec. 3, Fig. 4), pre-norm:

        x = x + SelfAttn(LN1(x))
        x = x + CrossAttn(LN2(x), LN_m(memory))
        x = x + MLP(LN3(x))

    The memory (the other views' tokens) is normalised by the block's own LayerNorm and left
    unchanged, so every block reads the same tokens. As in CroCo's decoder: MLP ratio 4 (GELU),
    qkv biases, LayerNorm eps 1e-6, no dropout; the final norm is CDGMAE.decoder_norm.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.norm_memory = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def init_weights(self):
        """CroCo's init: xavier-uniform Linears, zero biases, unit LayerNorms. CroCo projects
        keys and values with two [D, D] Linears, so each half of the fused kv weight gets its
        own draw (bound sqrt(6 / 2D), not the fused [2D, D]'s sqrt(6 / 3D))."""
        self.apply(_init_linear_and_norm)
        for half in self.cross_attn.kv.weight.data.chunk(2):
            nn.init.xavier_uniform_(half)

    def forward(self, x, memory):  # x [B, 1+L, Dd] target stream, memory [B, M, Dd] anchor tokens
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), self.norm_memory(memory))
        return x + self.mlp(self.norm3(x))


# -----------------------------------------------------------------------------
# Masking (MAE's per-sample random permutation)
# -----------------------------------------------------------------------------

def random_masking(x, mask_ratio, noise=None):
    """Keep a random subset of `int(L * (1 - mask_ratio))` tokens of each sample.

    x [B, L, D]; noise [B, L] in [0, 1) decides the order (lowest noise is kept), so a
    caller can make the masks reproducible. Returns the kept tokens [B, K, D], the binary
    mask [B, L] (1 = masked, 0 = visible) and ids_restore [B, L], the inverse permutation.
    """
    B, L, D = x.shape
    num_keep = int(L * (1 - mask_ratio))  # 19 of 196 at 90%, 147 at 25%
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, L, device=x.device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


# -----------------------------------------------------------------------------
# Encoder: a ViT whose state dict is the MAE / DINO / timm layout
# -----------------------------------------------------------------------------

class VisionTransformer(nn.Module):
    """ViT encoder e_theta: patch embedding, cls token, fixed sin-cos position embedding,
    pre-norm blocks and a final LayerNorm.

    State-dict keys: cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.norm1 / attn.qkv /
    attn.proj / norm2 / mlp.fc1 / mlp.fc2, norm.* -- the names of official MAE, DINO,
    CropMAE and timm ViTs, so their checkpoints load with strict=True.
    """

    def __init__(self, img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed (not learned) position embedding, as in MAE; a zero vector in the cls slot.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.pos_embed.data.copy_(sincos_pos_embed(embed_dim, self.grid_size, self.grid_size).unsqueeze(0))
        self._init_encoder_weights()

    def _init_encoder_weights(self):
        # MAE's initialisation: the patch conv like a Linear on its flattened weight.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_and_norm)

    def pos_embed_for_grid(self, grid_h, grid_w):
        """[1, 1 + grid_h * grid_w, D]: the stored embedding, interpolated to another grid."""
        return interpolate_pos_embed(self.pos_embed, grid_h, grid_w)

    def embed(self, x):
        """Image [B, 3, H, W] -> patch tokens with position [B, L, D], and the cls token [B, 1, D]."""
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        pos = self.pos_embed_for_grid(grid_h, grid_w)
        tokens = self.patch_embed(x) + pos[:, 1:]  # position added before masking
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        return tokens, cls

    def run_blocks(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_masked(self, x, mask_ratio, noise=None):
        """Eq. (5)/(6): e_theta(m(rho(x), ratio)).

        x [B, 3, H, W] -> tokens [B, 1 + K, D] (cls first, then the K visible patches in
        kept order), mask [B, L] (1 = masked), ids_restore [B, L]. With mask_ratio == 0 no
        token is dropped or shuffled (an unmasked anchor, r_a = 0).
        """
        tokens, cls = self.embed(x)
        B, L, _ = tokens.shape
        if mask_ratio > 0:
            tokens, mask, ids_restore = random_masking(tokens, mask_ratio, noise)
        else:
            mask = torch.zeros(B, L, device=x.device)
            ids_restore = torch.arange(L, device=x.device).expand(B, L)
        return self.run_blocks(torch.cat([cls, tokens], dim=1)), mask, ids_restore

    def forward_features(self, x):
        """Unmasked features of the last block after the final norm: [B, 1 + h*w, D], cls first.
        Any input size works: the position embedding is interpolated to the patch grid.
        (A CDGMAE inherits this, so a whole pre-training model is also a feature extractor.)"""
        tokens, cls = self.embed(x)
        return self.run_blocks(torch.cat([cls, tokens], dim=1))

    def forward(self, x):
        return self.forward_features(x)


def _init_linear_and_norm(m):
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def vit_tiny(**kwargs):
    return VisionTransformer(**{"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs})


def vit_small(**kwargs):
    """ViT-S: width 384, 12 blocks, 6 heads (the paper's encoder; patch_size=8 for ViT-S/8)."""
    return VisionTransformer(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})


def vit_base(**kwargs):
    """ViT-B: width 768, 12 blocks, 12 heads (MAE's ViT-B/16, used for the metrics of Table 1)."""
    return VisionTransformer(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})


VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


# -----------------------------------------------------------------------------
# CDG-MAE (Sec. 3.3, Eq. 4-10)
# -----------------------------------------------------------------------------

class CDGMAE(VisionTransformer):
    """Siamese cross-view MAE with N anchors and anchor masking (Sec. 3.3, Eq. 4-10).

    The encoder is this class's ViT part (so a checkpoint's keys are MAE's: cls_token,
    blocks.*, ..., then decoder_embed, mask_token, decoder_pos_embed, decoder_blocks.*,
    decoder_norm, decoder_pred). The defaults are Table 6's, the paper's default training
    setting "under the single anchor setting" (CDG-MAE-a1): one unmasked anchor
    (num_anchors=1, anchor_mask_ratio=0.0), a ViT-S/16 encoder, a 4-block decoder of width 256
    (Sec. 4) and a target mask ratio of 0.9. The paper's best model, CDG-MAE-a3 (Sec. 5.2,
    Tables 4 and 5), is CDGMAE(num_anchors=3, anchor_mask_ratio=0.25).

    decoder_block="cdgmae" is the paper's (CropMAE's) post-norm block: cross-attention,
    feed-forward, self-attention; the memory gets no position embedding. decoder_block="croco"
    swaps in CroCo's pre-norm block (CroCoDecoderBlock: MLP ratio 4, no dropout, so
    decoder_ffn_dim and decoder_dropout do not apply) and, as in CroCo, adds the decoder's
    sin-cos position embedding to the memory too: each anchor's tokens get the embedding of
    their own patch positions (zero in the cls slot).

    forward(target [B, 3, H, W], anchors [B, N, 3, H, W]) -> loss, pred [B, L, P*P*3], mask [B, L]
    """

    def __init__(self, num_anchors=1, anchor_mask_ratio=0.0, target_mask_ratio=0.9,
                 img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                 decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8, decoder_ffn_dim=2048,
                 decoder_dropout=0.1, norm_pix_loss=True, decoder_block="cdgmae"):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads)
        if not 0 <= anchor_mask_ratio < 1 or not 0 < target_mask_ratio < 1:
            raise ValueError("mask ratios must lie in [0, 1) (anchors) and (0, 1) (target)")
        if decoder_block not in ("cdgmae", "croco"):
            raise ValueError(f"decoder_block {decoder_block!r}: must be 'cdgmae' or 'croco'")
        self.decoder_block = decoder_block
        self.num_anchors = num_anchors
        self.anchor_mask_ratio = anchor_mask_ratio
        self.target_mask_ratio = target_mask_ratio
        self.norm_pix_loss = norm_pix_loss

        # One Linear maps encoder tokens of the target and of every anchor to the decoder width.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, decoder_embed_dim),
                                              requires_grad=False)
        if decoder_block == "croco":
            blocks = [CroCoDecoderBlock(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth)]
        else:
            blocks = [DecoderBlock(decoder_embed_dim, decoder_num_heads, decoder_ffn_dim, decoder_dropout)
                      for _ in range(decoder_depth)]
        self.decoder_blocks = nn.ModuleList(blocks)
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3)

        self.decoder_pos_embed.data.copy_(
            sincos_pos_embed(decoder_embed_dim, self.grid_size, self.grid_size).unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder_embed.apply(_init_linear_and_norm)
        for block in self.decoder_blocks:
            block.init_weights()
        for m in [self.decoder_norm, self.decoder_pred]:
            m.apply(_init_linear_and_norm)

    # -- pixels <-> patches ---------------------------------------------------
    def patchify(self, imgs):
        """[B, 3, H, W] -> [B, L, P*P*3], channel last within a patch (MAE's order)."""
        P = self.patch_size
        B, C, H, W = imgs.shape
        x = imgs.reshape(B, C, H // P, P, W // P, P)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // P) * (W // P), P * P * C)

    def unpatchify(self, x, grid_h=None, grid_w=None):
        """[B, L, P*P*3] -> [B, 3, H, W]."""
        P = self.patch_size
        grid_h = grid_h or self.grid_size
        grid_w = grid_w or self.grid_size
        x = x.reshape(x.shape[0], grid_h, grid_w, P, P, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], 3, grid_h * P, grid_w * P)

    # -- Eq. (8)-(9) ----------------------------------------------------------
    def forward_decoder(self, target_latent, ids_restore, memory):
        """target_latent [B, 1+K, D] (cls + visible), ids_restore [B, L], memory [B, M, Dd]
        -> predicted pixels of every target patch [B, L, P*P*3]."""
        x = self.decoder_embed(target_latent)
        B, L = ids_restore.shape
        # Eq. (8): T_a = [T'_v, mask tokens], put back in image order (cls stays first).
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        # Eq. (9): T_r = d_psi(T_a, A'_v). Each block of the paper's decoder (Sec. 4, DecoderBlock) runs
        # cross-attention to the anchors A'_v, then the feed-forward, then self-attention over T_a;
        # with decoder_block="croco" (CroCoDecoderBlock): self-attention, cross-attention, MLP.
        for block in self.decoder_blocks:
            x = block(x, memory)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]  # drop the cls row

    def memory_pos_embed(self, ids_restore, num_kept):
        """CroCo: the reference view's tokens get the decoder position embedding too.
        ids_restore [B', L] of an anchor's masking (forward_masked) -> [B', 1 + num_kept, Dd]:
        the cls slot's (zero) row, then the rows of the kept patches in kept order."""
        # forward_masked keeps ids_shuffle[:, :K]; ids_restore is its inverse permutation.
        ids_keep = torch.argsort(ids_restore, dim=1)[:, :num_kept]
        pos = self.decoder_pos_embed.expand(ids_keep.shape[0], -1, -1)
        kept = torch.gather(pos[:, 1:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, pos.shape[2]))
        return torch.cat([pos[:, :1], kept], dim=1)

    # -- Eq. (10) -------------------------------------------------------------
    def forward_loss(self, target, pred, mask):
        """Mean squared error over the masked target patches only (Eq. 10).

        As in MAE the squared error is averaged over the pixels of a patch, then over the
        masked patches. With norm_pix_loss each target patch is normalised by its own mean
        and (unbiased) variance, eps 1e-6.
        """
        patches = self.patchify(target)
        if self.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)
            var = patches.var(dim=-1, keepdim=True)
            patches = (patches - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - patches.float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, target, anchors, target_noise=None, anchor_noise=None):
        """target [B, 3, H, W], anchors [B, N, 3, H, W]; optional masking noise
        target_noise [B, L], anchor_noise [B, N, L] (uniform in [0, 1), for reproducible masks).
        Returns loss (scalar), pred [B, L, P*P*3], mask [B, L] (1 = masked, i.e. predicted)."""
        B, N = anchors.shape[:2]
        if N != self.num_anchors:
            raise ValueError(f"model built for {self.num_anchors} anchors, got {N}")
        # Eq. (4)-(5): target patchified, masked at r_t, visible patches encoded.
        target_latent, mask, ids_restore = self.forward_masked(target, self.target_mask_ratio, target_noise)
        # Eq. (6): every anchor masked independently at r_a by the same (Siamese) encoder;
        # the N anchors of a sample go through it as N rows of one batch.
        if anchor_noise is not None:
            anchor_noise = anchor_noise.flatten(0, 1)
        anchor_latent, _, anchor_ids_restore = self.forward_masked(
            anchors.flatten(0, 1), self.anchor_mask_ratio, anchor_noise)
        # Eq. (7): A'_v = [A'^1_v; ...; A'^N_v], cls tokens included, at the decoder width.
        memory = self.decoder_embed(anchor_latent)  # [B*N, 1+K_a, Dd]
        if self.decoder_block == "croco":  # CroCo: position embedding on the memory as well
            memory = memory + self.memory_pos_embed(anchor_ids_restore, memory.shape[1] - 1)
        memory = memory.reshape(B, N * anchor_latent.shape[1], -1)
        pred = self.forward_decoder(target_latent, ids_restore, memory)
        return self.forward_loss(target, pred, mask), pred, mask


# -----------------------------------------------------------------------------
# FLOP counting (Sec. A.3.1, Table 8)
# -----------------------------------------------------------------------------

def count_flops(model, num_anchors=None, batch_size=1):
    """Count the FLOPs of one forward pass up to the loss, fvcore's convention.

    Every nn.Linear and nn.Conv2d counts one FLOP per multiply-add and every affine
    LayerNorm 5 FLOPs per element (fvcore's defaults); the products inside
    F.scaled_dot_product_attention are not counted by fvcore, so they are returned
    separately as `attention` (multiply-adds of q.k and attn.v). Returns a dict of
    per-sample counts: linear, conv, layernorm, attention, fvcore (= the first three).
    """
    num_anchors = num_anchors or model.num_anchors
    counts = {"linear": 0, "conv": 0, "layernorm": 0, "attention": 0}

    def linear_hook(m, inputs, out):
        counts["linear"] += inputs[0].numel() // m.in_features * m.in_features * m.out_features

    def conv_hook(m, inputs, out):
        kh, kw = m.kernel_size
        counts["conv"] += out.numel() * (m.in_channels // m.groups) * kh * kw

    def norm_hook(m, inputs, out):
        counts["layernorm"] += inputs[0].numel() * (5 if m.elementwise_affine else 4)

    def self_attn_hook(m, inputs, out):
        B, L, D = inputs[0].shape
        counts["attention"] += 2 * B * L * L * D

    def cross_attn_hook(m, inputs, out):
        (B, Lq, D), Lm = inputs[0].shape, inputs[1].shape[1]
        counts["attention"] += 2 * B * Lq * Lm * D

    hooks = []
    for m in model.modules():
        hook = {nn.Linear: linear_hook, nn.Conv2d: conv_hook, nn.LayerNorm: norm_hook,
                Attention: self_attn_hook, CrossAttention: cross_attn_hook}.get(type(m))
        if hook is not None:
            hooks.append(m.register_forward_hook(hook))
    size = model.img_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(batch_size, 3, size, size, device=device),
                  torch.zeros(batch_size, num_anchors, 3, size, size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    counts = {k: v / batch_size for k, v in counts.items()}
    counts["fvcore"] = counts["linear"] + counts["conv"] + counts["layernorm"]
    return counts


# -----------------------------------------------------------------------------
# Bags of views (Sec. 3.1): a sample is a target and N anchors of one bag
# -----------------------------------------------------------------------------
#
#   BAGS/<relative folder of the real image>/<image stem>/     one folder per real image
#       real.<ext>                  the real image (its original bytes)
#       view_00.jpg ... view_{M-1}  the M generated views
#
# `generate_views.py` writes this layout (mirroring the input tree); a bag is any folder
# holding a file named real.*. Files are written under a temporary name and renamed,
# so a name that matches below is always complete.



class BagDataset(torch.utils.data.Dataset):
    """Samples (target, N anchors) from bags of views (Sec. 3.1 and 4, Tables 2 and 6).

    An item is addressed by (epoch, index): everything random about it -- which view is
    the target, which N views are anchors, the crop box and flip shared by all of its
    views, and the masking noise -- is drawn from a generator seeded by (seed, epoch,
    index). So a sample does not depend on the worker, rank or world size that loads it,
    which makes resumed and multi-process runs reproduce single-process ones. The box is
    drawn once on the bag's common geometry and mapped into each image (`geometry`,
    `image_boxes`), so it cuts the same part of the scene in the real image and every view.

    An item is (target [3, S, S] uint8, anchors [N, 3, S, S] uint8, target_noise [L],
    anchor_noise [N, L]); the ImageNet normalisation runs on the device (`normalize`).
    With encoded=True (--decode gpu) the images stay encoded: ([N+1] byte tensors, boxes
    [N+1, 4] (each image's box, from the sizes in the files' headers), flip, target_noise,
    anchor_noise), for `collate_encoded` and `assemble_on_device`.

    A bag with an image that cannot be decoded is replaced by the next bags in order
    (index + 1, + 2, ...), drawn with the generator of (seed, epoch, index, attempt): the
    same substitute in every run, so resume and multi-process equality still hold. The
    bag is appended to `bad_bags_file` and each process warns once.

    target_choice: "any" (real or generated at random, the paper's default),
    "real" (always the real image) or "generated" (always a generated view).
    """

    MAX_SUBSTITUTES = 16
    ITEM = "bag"         # what an item is, in messages
    MODE = "bicubic"     # crop_resize's interpolation

    def __init__(self, root, bags, num_views, num_anchors=1, input_size=224, target_choice="any",
                 crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3), num_patches=196, seed=0,
                 encoded=False, bad_bags_file=None):
        self.root, self.bags = Path(root), list(bags)
        self.num_views, self.num_anchors = num_views, num_anchors
        self.input_size, self.target_choice = input_size, target_choice
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.num_patches, self.seed = num_patches, seed
        self.encoded, self.bad_bags_file, self.reported = encoded, bad_bags_file, set()
        if target_choice not in ("any", "real", "generated"):
            raise ValueError(f"target_choice must be any, real or generated, not {target_choice!r}")

    def __len__(self):
        return len(self.bags)

    def choose_views(self, rng):
        """Indices into [real, view_00, ...]: the target first, then N distinct anchors."""
        everything = list(range(1 + self.num_views))
        if self.target_choice == "real":
            target = 0
        elif self.target_choice == "generated":
            target = int(rng.integers(1, 1 + self.num_views))
        else:
            target = int(rng.integers(0, 1 + self.num_views))
        rest = [i for i in everything if i != target]
        if self.target_choice == "real" and len(rest) < self.num_anchors:
            raise ValueError("not enough generated views for the anchors")
        anchors = rng.choice(rest, size=self.num_anchors, replace=False)
        return [target] + [int(a) for a in anchors]

    def __getitem__(self, key):
        return self.item(key)

    def __getitems__(self, keys):
        """The DataLoader's fetch of a batch: `collated`, in shared memory inside a worker."""
        return self.collated(keys, shared=torch.utils.data.get_worker_info() is not None)

    def collated(self, keys, shared=False):
        """The items of `keys` stacked as default_collate stacks them: (target [B, 3, S, S], anchors
        [B, N, 3, S, S], target_noise [B, L], anchor_noise [B, N, L]), each crop written straight
        into its row of the batch, so no item is copied again to collate it. `shared`: the batch
        is allocated in shared memory. Encoded items (--decode gpu) stay a list, for collate_encoded."""
        if self.encoded:
            return [self.item(key) for key in keys]
        b, n, size, patches = len(keys), self.num_anchors, self.input_size, self.num_patches
        target = batch_tensor((b, 3, size, size), torch.uint8, shared)
        anchors = batch_tensor((b, n, 3, size, size), torch.uint8, shared)
        target_noise = batch_tensor((b, patches), torch.float32, shared)
        anchor_noise = batch_tensor((b, n, patches), torch.float32, shared)
        # The files of all items first, then the decodes and crops: between two decodes, which
        # evict them from the caches, the listing and the draws take about 4 times the CPU.
        firsts = [self.first_files(key) for key in keys]
        for i, (key, first) in enumerate(zip(keys, firsts)):
            item = self.item(key, [target[i], *anchors[i]], first)
            target_noise[i], anchor_noise[i] = item[2], item[3]
        return target, anchors, target_noise, anchor_noise

    def first_files(self, key):
        """(files, generator) of the first attempt at the item `key`, or None where they cannot be
        listed (`item` then tries again and reports it)."""
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            return self.files(self.bags[index % len(self.bags)], rng), rng
        except UnreadableImage:
            return None

    def item(self, key, out=None, first=None):
        """The item (epoch, index), its crops written into `out` where given (see `crop_views`).
        `first`: the files and generator of the first attempt, if drawn already (`first_files`)."""
        epoch, index = key
        for attempt in range(self.MAX_SUBSTITUTES + 1):
            bag = self.bags[(index + attempt) % len(self.bags)]
            try:
                if attempt == 0 and first is not None:
                    files, rng = first
                else:
                    rng = np.random.default_rng([self.seed, epoch, index] + ([attempt] if attempt else []))
                    files = self.files(bag, rng)
                return self.cut_views(files, rng, out)
            except UnreadableImage as e:
                self.report_bad(bag, e)
        raise RuntimeError(f"{self.root / self.bags[index]}: it and the next {self.MAX_SUBSTITUTES} "
                           f"{self.ITEM}s cannot be decoded (list them with --verify-images decode)")

    def files(self, bag, rng):
        """The image files of an item, [target, anchor_1, ..., anchor_N]: the draws before any decode."""
        real, views = bag_files(self.root / bag)
        paths = [real] + views[:self.num_views]
        return [paths[i] for i in self.choose_views(rng)]

    def draw_noise(self, rng):
        """The masking noise of the target [L] and of the anchors [N, L] (after the crops' draws)."""
        return (torch.from_numpy(rng.random(self.num_patches, dtype=np.float32)),
                torch.from_numpy(rng.random((self.num_anchors, self.num_patches), dtype=np.float32)))

    def geometry(self, chosen, sizes):
        """Where the shared box is drawn and what it is relative to in each image: ((width, height)
        of the common geometry, [region of each image, fractions (l, t, r, b)]).

        A bag's views are generated from the real image's centre region (`conditioning_region`),
        so that region is the bag's common geometry: the real image's region is the one the
        generator was conditioned on, a square view's is the whole view, and the box is drawn on
        a square of the views' size (the first view's shorter side). A view that is not square
        (k-NN bags hold other real images) is brought to its own centre square, the crop its
        neighbour search embedded. In a bag of square images of one size (the toy world's) every
        region is (0, 0, 1, 1): the box is the same fractions of every image."""
        regions = [conditioning_region(width, height) for width, height in sizes]
        side = next(min(size) for path, size in zip(chosen, sizes) if not is_real_image(path))
        return (side, side), regions

    def cut_views(self, chosen, rng, out=None):
        """The item of the image files [target, anchor_1, ..., anchor_N]: one box and one flip for all."""
        if self.encoded:
            blobs, sizes = zip(*[read_encoded(p) for p in chosen])
        else:
            images = [decode_rgbx(p) for p in chosen]
            sizes = [(image.shape[-1], image.shape[-2]) for image in images]
        (width, height), regions = self.geometry(chosen, sizes)
        # One crop box (drawn on the common geometry) and one flip for all views of the sample.
        box = sample_crop_box(rng, width, height, self.crop_scale, self.crop_ratio)
        flip = rng.random() < 0.5
        target_noise, anchor_noise = self.draw_noise(rng)
        boxes = image_boxes(box, regions)
        if self.encoded:
            return list(blobs), torch.tensor(boxes, dtype=torch.float64), torch.tensor(flip), target_noise, anchor_noise
        crops = crop_views(images, boxes, flip, self.input_size, self.MODE, out)
        return crops[0], crops[1:], target_noise, anchor_noise

    def report_bad(self, bag, error):
        """List a bag whose image cannot be decoded (once per process) and warn once."""
        if bag in self.reported:
            return
        if not self.reported:
            print(f"warning: {error}; {self.ITEM} {bag} is replaced by the next {self.ITEM} in a fixed order "
                  f"(listed in {self.bad_bags_file or 'no file'}; further such {self.ITEM}s are listed there only)",
                  file=sys.stderr)
        self.reported.add(bag)
        if self.bad_bags_file:
            with open(self.bad_bags_file, "a") as f:  # one short append: whole lines from many processes
                f.write(f"{bag}\t{' '.join(str(error).split())}\n")


def sample_crop_box(rng, width, height, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (torchvision's algorithm), as fractions (l, t, r, b) of the image."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left / width, top / height, (left + w) / width, (top + h) / height
    # Fallback: the largest central crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left / width, top / height, (left + w) / width, (top + h) / height


def conditioning_region(width, height, size=224):
    """The centre region of a width x height image that generate_views.py conditions the generator
    on, as fractions (l, t, r, b) of the image: `conditioning_tensor`'s crop (metrics.evaluation_image:
    the shorter side resized to `size` with rounding, a size x size centre crop) in the image's own
    pixels. A square image's region is the whole image, exactly (0, 0, 1, 1). `size` is the S-LDM
    conditioner's input (224 for DINO ViT-B/16); the image-variation pipeline's CLIPImageProcessor
    crops the same centre square with its long side truncated instead of rounded (docs/training.md)."""
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return left / new_w, top / new_h, (left + size) / new_w, (top + size) / new_h


def image_boxes(box, regions):
    """The shared box (fractions of the common geometry) as each image's box (fractions of that
    image): the box composed with the image's region, [compose_box(region, box), ...]. A region
    (0, 0, 1, 1) leaves the box as it is, bit for bit."""
    return [compose_box(region, box) for region in regions]


def crop_views(images, boxes, flip, size, mode="bicubic", out=None):
    """The views of one sample, each cut with its own box (the sample's shared box mapped to each
    image, `image_boxes`) and one shared flip: [C, H_i, W_i] uint8 images (C = 3 or 4, any sizes,
    any device) -> [V, 3, size, size] uint8, written into `out` where given (V tensors
    [3, size, size]: rows of a batch, see `BagDataset.collated`)."""
    if out is None:
        out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=images[0].device)
    for crop, image, box in zip(out, images, boxes):
        copy_flipped(crop, crop_resize(image, box, size, mode=mode)[:3], flip)
    return out


# -----------------------------------------------------------------------------
# Pretext data of the family (Table 5): CropMAE's crops and SiamMAE's video frames
# -----------------------------------------------------------------------------
# The same model and trainer, other data: --pretext crops reads a plain image folder (any
# depth, ImageNet layout), --pretext frames a folder of videos stored as frame folders
# (DAVIS/Kinetics style: ROOT/<video>/<frame>.jpg, at any depth). An item is one image or one
# video; an epoch is one sample per item. Both keep BagDataset's properties: every draw comes
# from the generator of (seed, epoch, index), uint8 output, substitution of unreadable items.

PRETEXTS = ("bags", "crops", "frames")
PRETEXT_ITEMS = {"bags": "bag", "crops": "image", "frames": "video"}

# The flags left unset (None) take their pretext's value: bags the paper's (Table 6), crops
# CropMAE's ImageNet script (GlobalToLocal: global area [0.10, 1], mask 98.5%), frames
# SiamMAE's (CropMAE's SiamMAE script: area [0.5, 1], mask 95%).
PRETEXT_DEFAULTS = {"bags": dict(target_mask=0.9, crop_scale=(0.5, 1.0), crop_ratio=(0.75, 1.33)),
                    "crops": dict(target_mask=0.985, crop_scale=(0.10, 1.0), crop_ratio=(3 / 4, 4 / 3)),
                    "frames": dict(target_mask=0.95, crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3))}
FRAME_GAP = (4, 48)  # SiamMAE: the target is 4 to 48 frames after its unmasked frame


def pretext_default(args, name):
    """args.<name>, or the pretext's default where the flag was not given."""
    value = getattr(args, name)
    return PRETEXT_DEFAULTS[getattr(args, "pretext", "bags")][name] if value is None else value


class CropDataset(BagDataset):
    """--pretext crops: CropMAE's GlobalToLocal (the paper's Table 5 baseline) on a plain image
    folder. The N anchors are global random resized crops of the image (area `crop_scale`),
    the target a random resized crop of the first one (area `local_scale` of it); see
    `sample_crop_params` and `cut_crops`. Items, noise, determinism and substitution as in
    BagDataset; encoded=True gives ([bytes], boxes [N + 1, 4], flips [N + 1], noises)."""

    ITEM, MODE = "image", "bilinear"

    def __init__(self, root, images, num_anchors=1, input_size=224, crop_scale=(0.10, 1.0), local_scale=(0.3, 0.6),
                 crop_ratio=(3 / 4, 4 / 3), num_patches=196, seed=0, encoded=False, bad_bags_file=None):
        super().__init__(root, images, 0, num_anchors, input_size, "any", crop_scale, crop_ratio, num_patches,
                         seed, encoded, bad_bags_file)
        self.local_scale = local_scale

    def files(self, image, rng):
        return [self.root / image]

    def cut_views(self, files, rng, out=None):
        path = files[0]
        if self.encoded:
            blob, (width, height) = read_encoded(path)
        else:
            pixels = decode_rgbx(path)
            height, width = pixels.shape[-2:]
        global_boxes, local_box, flips = sample_crop_params(rng, width, height, self.num_anchors, self.input_size,
                                                            self.crop_scale, self.local_scale, self.crop_ratio)
        target_noise, anchor_noise = self.draw_noise(rng)
        if self.encoded:
            boxes = torch.tensor(global_boxes + [local_box], dtype=torch.float64)
            return [blob], boxes, torch.tensor(flips), target_noise, anchor_noise
        return (*cut_crops(pixels, global_boxes, local_box, flips, self.input_size, out), target_noise, anchor_noise)


def sample_crop_params(rng, width, height, num_anchors, size, global_scale=(0.10, 1.0), local_scale=(0.3, 0.6),
                       ratio=(3 / 4, 4 / 3)):
    """CropMAE's GlobalToLocal draws for one image of width x height: N global boxes (fractions
    of the image; area `global_scale`), one local box (fractions of the first global crop once
    resized to size x size, in whole pixels of it; area `local_scale` of it), and N + 1 flips
    drawn one per view (target first), as CropMAE flips each view on its own.
    Returns ([N boxes], local box, [N + 1 bools])."""
    global_boxes = [sample_crop_box(rng, width, height, global_scale, ratio) for _ in range(num_anchors)]
    local_box = sample_crop_box(rng, size, size, local_scale, ratio)
    flips = [bool(rng.random() < 0.5) for _ in range(num_anchors + 1)]
    return global_boxes, local_box, flips


def cut_crops(image, global_boxes, local_box, flips, size, out=None):
    """CropMAE's views of one image [C, H, W] uint8 (C = 3 or 4, see `crop_resize`): the anchors
    are the global crops [N, 3, S, S], the target a crop of the first global crop after its resize
    (as CropMAE crops the resized global view), all antialiased bilinear; then each view is
    flipped by its own draw. Returns (target [3, S, S], anchors [N, 3, S, S]) uint8, written
    into `out` where given (as in `crop_views`)."""
    anchors = [crop_resize(image, box, size, mode="bilinear") for box in global_boxes]
    views = [crop_resize(anchors[0], local_box, size, mode="bilinear")] + anchors
    if out is None:
        out = torch.empty(len(views), 3, size, size, dtype=torch.uint8, device=image.device)
    for crop, view, flip in zip(out, views, flips):
        copy_flipped(crop, view[:3], flip)
    return out[0], out[1:]


def compose_box(outer, inner):
    """The box `inner` (fractions of the crop `outer`) as fractions of the image `outer` is cut from."""
    width, height = outer[2] - outer[0], outer[3] - outer[1]
    return (outer[0] + inner[0] * width, outer[1] + inner[1] * height,
            outer[0] + inner[2] * width, outer[1] + inner[3] * height)


class FrameDataset(BagDataset):
    """--pretext frames: SiamMAE's frame pairs from videos stored as frame folders. The target
    is a frame 4 to 48 frames after its unmasked anchor (`sample_frame_indices`); one random
    resized crop box (area `crop_scale`) and one flip are shared by all frames of the sample,
    antialiased bilinear, as SiamMAE's data pipe does. Items, noise, determinism, substitution
    (a video with an unreadable frame, or fewer than gap[0] + 1 frames left since the start-up
    check) and the encoded form as in BagDataset."""

    ITEM, MODE = "video", "bilinear"

    def __init__(self, root, videos, num_anchors=1, input_size=224, crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3),
                 num_patches=196, seed=0, encoded=False, bad_bags_file=None, gap=FRAME_GAP):
        super().__init__(root, videos, 0, num_anchors, input_size, "any", crop_scale, crop_ratio, num_patches,
                         seed, encoded, bad_bags_file)
        self.gap = gap

    def geometry(self, chosen, sizes):
        """The frames of a video share one geometry: the box is drawn on the target frame's size
        and cuts the same fractions of every frame (SiamMAE's shared crop)."""
        return sizes[0], [(0.0, 0.0, 1.0, 1.0)] * len(sizes)

    def files(self, video, rng):
        frames = list_files(self.root / video)
        if len(frames) < self.gap[0] + 1:
            raise UnreadableImage(f"{self.root / video}: {len(frames)} frames, needs at least {self.gap[0] + 1}")
        return [frames[i] for i in sample_frame_indices(rng, len(frames), self.num_anchors, self.gap)]


def sample_frame_indices(rng, num_frames, num_anchors=1, gap=FRAME_GAP):
    """[target, anchor_1, ..., anchor_N] frame indices of a video of num_frames frames.

    The first pair is SiamMAE's: a gap g uniform in [gap[0], min(gap[1], n - 1)] (both ends
    included), the unmasked frame a uniform in [0, n - 1 - g], the target the later frame a + g.
    Anchors 2..N are other frames before the target, each at its own gap within the same range
    (distinct frames when the window before the target holds enough, else drawn with repeats)."""
    if num_frames < gap[0] + 1:
        raise ValueError(f"{num_frames} frames, needs at least {gap[0] + 1} (a gap of {gap[0]})")
    g = int(rng.integers(gap[0], min(gap[1], num_frames - 1) + 1))
    first = int(rng.integers(0, num_frames - g))
    target = first + g
    others = []
    if num_anchors > 1:
        window = [i for i in range(max(0, target - gap[1]), target - gap[0] + 1) if i != first] or [first]
        others = rng.choice(window, size=num_anchors - 1, replace=len(window) < num_anchors - 1).tolist()
    return [target, first] + [int(i) for i in others]


# -----------------------------------------------------------------------------
# Optimisation and the training loop (Sec. 4, Table 6): global batches, AdamW,
# warmup + per-iteration cosine, one epoch after another
# -----------------------------------------------------------------------------

class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's (epoch, index) keys, one global batch after another.

    Each epoch is a permutation of the bags seeded by (seed, epoch), cut into global
    batches of `global_batch` samples (the tail is dropped); rank r takes the r-th
    contiguous slice of each. `start_step` skips the global batches already trained
    on, to resume in the middle of an epoch. One sampler serves the whole run:
    `set_epoch` moves it on (the DataLoader's persistent workers are kept).
    """

    def __init__(self, num_samples, global_batch, rank, world_size, epoch=0, seed=0, start_step=0):
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size = rank, world_size
        self.epoch, self.seed, self.start_step = epoch, seed, start_step
        self.steps = num_samples // global_batch

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        per_rank = self.global_batch // self.world_size
        for step in range(self.start_step, self.steps):
            start = step * self.global_batch + self.rank * per_rank
            for index in order[start:start + per_rank]:
                yield self.epoch, index

    def __len__(self):
        return (self.steps - self.start_step) * (self.global_batch // self.world_size)


def learning_rate(args, epoch_float):
    """Linear warmup, then half-cycle cosine to min_lr; evaluated every iteration (MAE)."""
    if epoch_float < args.warmup_epochs:
        return args.lr * epoch_float / args.warmup_epochs
    progress = (epoch_float - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model, weight_decay):
    """AdamW groups by timm's rule, which MAE and CropMAE train with: no weight decay on biases
    and 1-D parameters (LayerNorms) only. The [1, 1, D] cls and mask tokens are decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_epoch(args, run, epoch, first, batches, global_step):
    """Steps first..end of one epoch (or up to --max-steps), as MAE's train_one_epoch: each step
    sets the lr of its iteration, runs --accum-iter forward/backward passes (bf16 autocast on
    CUDA), takes one optimizer step, and every --log-every steps logs the loss averaged over
    ranks. Returns (global_step, the last step index done, whether --max-steps stopped it, the
    last batch and prediction)."""
    steps = run.steps_per_epoch
    bar = tqdm(range(first, steps), desc=f"epoch {epoch}", disable=run.rank != 0, dynamic_ncols=True,
               initial=first, total=steps)
    run.model.train()
    t_last, seen, loss_steps = time.time(), 0, 0
    loss_sum = torch.zeros((), device=run.device)  # summed on the device: no sync per step
    step, stop, last = first - 1, False, None
    for step in bar:
        lr = learning_rate(args, epoch + step / steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        # Dropout (and any other model-side randomness) is a function of (seed, rank, step),
        # so a resumed run replays exactly what an uninterrupted one would have drawn.
        torch.manual_seed(args.seed * 1_000_003 + global_step * 1009 + run.rank)
        for micro in range(args.accum_iter):
            target, anchors, target_noise, anchor_noise = run.move(next(batches))
            sync = micro == args.accum_iter - 1 or run.world_size == 1
            with (contextlib.nullcontext() if sync else run.train_model.no_sync()), \
                    torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.device.type == "cuda"):
                loss, pred, mask = run.train_model(target, anchors, target_noise, anchor_noise)
            (loss / args.accum_iter).backward()
            loss_sum += loss.detach() / args.accum_iter
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        global_step, loss_steps, seen = global_step + 1, loss_steps + 1, seen + args.batch_size
        last = (target, anchors, pred.detach(), mask)
        if global_step % args.log_every == 0 or step == steps - 1:
            if run.device.type == "cuda":  # samples/s of steps the GPU has finished, not merely queued
                torch.cuda.synchronize(run.device)
            now = time.time()
            log_progress(run, bar, {"epoch": epoch, "step": global_step, "lr": lr}, loss_sum, loss_steps,
                         seen / max(now - t_last, 1e-9))
            t_last, seen, loss_steps = now, 0, 0
        if args.max_steps is not None and global_step >= args.max_steps:
            stop = True
            break
    return global_step, step, stop, last


def log_progress(run, bar, record, loss_sum, loss_steps, samples_per_s):
    """Average the loss over ranks (one collective every --log-every steps) and log it."""
    if run.world_size > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= run.world_size
    record.update(loss=loss_sum.item() / loss_steps, samples_per_s=samples_per_s)
    loss_sum.zero_()
    if run.rank == 0:
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", samples_per_s=f"{samples_per_s:.1f}")
        try:
            run.log.write(json.dumps(record) + "\n")
            run.log.flush()
        except OSError as e:
            raise SystemExit(f"{run.output / 'log.jsonl'}: cannot write the log ({e.strerror or e}) "
                             f"(free space in {run.output}, then rerun with --resume auto)") from None


def train(args, bags, rank, world_size, device, per_step, output, ckpt, resume):
    """Model, optimizer, loader and the epoch loop (Table 6); returns the model."""
    steps_per_epoch, item = len(bags) // args.batch_size, PRETEXT_ITEMS[args.pretext]
    if steps_per_epoch == 0:
        raise SystemExit(f"{args.data}: {len(bags)} {item}s is fewer than one global batch of {args.batch_size} "
                         f"(lower --batch-size or add {item}s)")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = CDGMAE(**model_config(args)).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=tuple(args.betas),
                                  fused=device.type == "cuda" or None)  # one kernel for all parameters
    start_epoch, start_step, global_step = resume_from(ckpt, resume, model, optimizer) if ckpt else (0, 0, 0)
    if args.max_steps is not None and global_step >= args.max_steps or start_epoch >= args.epochs:
        print(f"{output}: nothing to do (step {global_step}, epoch {start_epoch} of {args.epochs})")
        return model
    train_model = model_for_training(model, world_size, device, args.compile)  # DDP, torch.compile

    dataset = make_dataset(args, bags, model.num_patches, output)
    sampler = GlobalBatchSampler(len(bags), args.batch_size, rank, world_size, seed=args.seed)
    loader = make_loader(args, dataset, sampler, per_step, device)
    run = argparse.Namespace(model=model, train_model=train_model, optimizer=optimizer, rank=rank,
                             world_size=world_size, device=device, output=output, steps_per_epoch=steps_per_epoch,
                             settings=run_settings(args), move=batch_mover(args, device), log=None)
    if rank == 0:  # a summary line, args.json, the log, and checkpoint-0000.pth on a fresh start
        start_records(args, run, len(bags), per_step, resume if ckpt else None, (start_epoch, start_step, global_step))
    try:
        for epoch in range(start_epoch, args.epochs):
            first = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, first)  # the persistent workers stay; only the keys change
            global_step, step, stop, last = train_epoch(args, run, epoch, first, iter(loader), global_step)
            if rank == 0:
                save_checkpoint(args, run, epoch, step, global_step, last)
            if stop:
                break
    finally:
        if run.log:
            run.log.close()
        if world_size > 1:
            dist.destroy_process_group()
    return model


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.count_flops:
        counts = count_flops(CDGMAE(**{**model_config(args), "img_size": 224}))
        print(f"N={args.anchors} r_a={args.anchor_mask:g} r_t={args.target_mask:g}: "
              f"{counts['fvcore'] / 1e9:.2f} GFLOPs per sample (fvcore: Linear+Conv multiply-adds "
              f"{(counts['linear'] + counts['conv']) / 1e9:.3f} G, LayerNorm {counts['layernorm'] / 1e9:.3f} G; "
              f"attention products, not counted: {counts['attention'] / 1e9:.3f} G)")
        return counts

    # Everything that can be refused is checked before any expensive work.
    args.lr = peak_lr(args)
    output = Path(args.output)
    try:
        check_output_folder(output)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    resume = find_resume(args, output)
    ckpt = read_training_checkpoint(resume) if resume else None
    refuse_changed_settings(args, ckpt, resume, output)
    if ckpt:
        check_resume_fits(args, ckpt, resume)
    check_data_root(args)
    try:
        check_outside(output, args.data, "--output", "--data")
        rank, world_size, local_rank = torchrun_environment()
    except ValueError as e:
        raise SystemExit(str(e)) from None

    device = setup_distributed(rank, world_size, local_rank, args.dist_timeout)
    if args.decode == "gpu" and (device.type != "cuda" or importlib.util.find_spec("torchvision") is None):
        raise SystemExit(f"--decode gpu: needs a CUDA device and torchvision (nvJPEG); this process has "
                         f"{'a' if device.type == 'cuda' else 'no'} CUDA device and "
                         f"{'no ' if importlib.util.find_spec('torchvision') is None else ''}torchvision "
                         "(use --decode cpu)")
    per_step = args.batch_size // (world_size * args.accum_iter)
    if per_step * world_size * args.accum_iter != args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size}: not divisible by {world_size} ranks x "
                         f"{args.accum_iter} accumulation steps (choose a multiple of {world_size * args.accum_iter})")
    try:
        bags, args.views = scan_bag_root(args, rank, world_size, output)
    except ValueError as e:  # a name that breaks the lists, a symbolic link that loops
        raise SystemExit(one_line(e)) from None
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output)
    args.bags = bag_list_id(bags, PRETEXT_ITEMS[args.pretext])
    refuse_changed_settings(args, ckpt, resume, output)  # now with the views and the bag list known
    return train(args, bags, rank, world_size, device, per_step, output, ckpt, resume)


# -----------------------------------------------------------------------------
# The training run's pieces: dataset, loader, batches on the device, checkpoints, pictures
# -----------------------------------------------------------------------------

def make_dataset(args, items, num_patches, output):
    """The dataset of --pretext: BagDataset, CropDataset or FrameDataset."""
    common = dict(num_patches=num_patches, seed=args.seed, encoded=args.decode == "gpu",
                  bad_bags_file=output / ("bad_bags.txt" if args.pretext == "bags" else f"bad_{args.pretext}.txt"))
    scale, ratio = tuple(args.crop_scale), tuple(args.crop_ratio)
    if args.pretext == "crops":
        return CropDataset(args.data, items, args.anchors, args.input_size, scale, tuple(args.local_scale), ratio,
                           **common)
    if args.pretext == "frames":
        return FrameDataset(args.data, items, args.anchors, args.input_size, scale, ratio, **common)
    return BagDataset(args.data, items, args.views, args.anchors, args.input_size, args.target_view, scale, ratio,
                      **common)


def make_loader(args, dataset, sampler, per_step, device):
    """One DataLoader for the whole run: persistent workers (the sampler is moved on with
    set_epoch), uint8 batches (encoded ones with --decode gpu), and a prefetch depth of about 256 samples per worker (2 batches
    of 128 or more, up to 8 small ones), so large batches do not pile up in shared memory."""
    extra = {}
    if args.workers > 0:
        extra = dict(persistent_workers=True, prefetch_factor=min(8, max(2, -(-256 // per_step))))
    return torch.utils.data.DataLoader(dataset, batch_size=per_step, sampler=sampler, num_workers=args.workers,
                                       pin_memory=device.type == "cuda" and args.decode == "cpu", drop_last=False,
                                       collate_fn=collate_encoded if args.decode == "gpu" else collate_batch, **extra)


def batch_mover(args, device):
    """A loader batch -> (target, anchors) normalised on the device, and the masking noise."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)

    def move(batch):
        if args.decode == "gpu" and args.pretext == "crops":
            target, anchors, target_noise, anchor_noise = assemble_crops_on_device(batch, args.input_size, device)
        elif args.decode == "gpu":
            target, anchors, target_noise, anchor_noise = assemble_on_device(
                batch, args.input_size, device, mode="bicubic" if args.pretext == "bags" else "bilinear")
        else:
            target, anchors, target_noise, anchor_noise = [t.to(device, non_blocking=True) for t in batch]
        return normalize(target, mean, std), normalize(anchors, mean, std), target_noise, anchor_noise
    return move


def save_checkpoint(args, run, epoch, step, global_step, last):
    """checkpoint-last.pth after every epoch or stop, a kept copy every --save-every epochs and
    a reconstruction picture every --vis-every epochs (rank 0; each written atomically)."""
    finished = step == run.steps_per_epoch - 1
    next_epoch, next_step = (epoch + 1, 0) if finished else (epoch, step + 1)
    ckpt = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "next_epoch": next_epoch,
            "next_step": next_step, "global_step": global_step, "args": run.settings}

    def write(tmp):
        with open(tmp, "wb") as f:  # a Python file, so that a full disk is an OSError
            torch.save(ckpt, f)
    write_or_exit(run.output / "checkpoint-last.pth", write, "the checkpoint")
    if finished and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs):
        write_or_exit(run.output / f"checkpoint-{epoch + 1:04d}.pth", write, "the checkpoint")
    if finished and last and args.vis_every and ((epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs):
        picture = reconstruction_image(run.model, *last)
        write_or_exit(run.output / f"reconstruction-{epoch + 1:04d}.png",
                     lambda tmp: picture.save(tmp, format="PNG"), "the reconstruction picture")


def save_initial_checkpoint(run):
    """checkpoint-0000.pth: the weights before the first step, in the format of the other
    checkpoints (a run can also resume from it), so that the random-init baseline of a run is
    read from a file rather than re-derived from the seed."""
    ckpt = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "next_epoch": 0,
            "next_step": 0, "global_step": 0, "args": run.settings}

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
    write_or_exit(run.output / "checkpoint-0000.pth", write, "the initial checkpoint")


def start_records(args, run, num_items, per_step, resumed, start):
    """Rank 0, before the first step: print the run's sizes (and where it resumed), write
    OUTPUT/args.json, cut log.jsonl to the steps done (`truncate_log`) and open it for appending,
    and on a fresh start write the initial weights (`save_initial_checkpoint`).
    resumed: the checkpoint resumed from, or None; start: (epoch, step, global step)."""
    (start_epoch, start_step, global_step), output = start, run.output
    counts = count_flops(CDGMAE(**{**model_config(args), "decoder_dropout": 0.0}))
    data = {"bags": f"{num_items} bags of 1 real + {args.views} views",
            "crops": f"{num_items} images (CropMAE crops)", "frames": f"{num_items} videos (SiamMAE frames)"}
    print(f"{data[args.pretext]}; {run.world_size} rank(s) x {per_step} samples x "
          f"{args.accum_iter} accumulation = global batch {args.batch_size}; {run.steps_per_epoch} steps/epoch; "
          f"lr {args.lr:.3g}; {counts['fvcore'] / 1e9:.3g} GFLOPs/sample (fvcore)")
    if resumed:
        print(f"resumed from {resumed}: epoch {start_epoch}, step {start_step} of {run.steps_per_epoch}")
    write_or_exit(output / "args.json", lambda tmp: Path(tmp).write_text(json.dumps(run.settings, indent=2)),
                 "the settings")
    truncate_log(output / "log.jsonl", global_step)
    run.log = open(output / "log.jsonl", "a")
    if global_step == 0:  # the initial weights: the random-init baseline of the same run
        save_initial_checkpoint(run)

def resume_from(ckpt, resume, model, optimizer):
    """Load a checkpoint's model and optimizer states; returns (next_epoch, next_step, global_step)."""
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(f"{resume}: does not fit this model ({first_line(e)}) "
                         "(--resume needs a checkpoint of this run)") from None
    return ckpt["next_epoch"], ckpt["next_step"], ckpt["global_step"]


def denormalize(x):
    """ImageNet-normalised [..., 3, H, W] -> [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruction_image(model, target, anchors, pred, mask, max_rows=4):
    """PIL grid, one row per sample: anchors | masked target | reconstruction | original.

    The reconstruction pastes the predicted patches among the visible ones; with the
    normalised-pixel loss the predictions are de-normalised with each true patch's
    mean and standard deviation (as MAE's visualisation does). Masked patches are grey.
    """
    target, anchors = target[:max_rows].float().cpu(), anchors[:max_rows].float().cpu()
    pred, m = pred[:max_rows].float().cpu(), mask[:max_rows].float().cpu().unsqueeze(-1)
    patches = model.patchify(target)
    if model.norm_pix_loss:
        pred = pred * (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(dim=-1, keepdim=True)
    recon = denormalize(model.unpatchify(patches * (1 - m) + pred * m))
    masked = model.unpatchify(model.patchify(denormalize(target)) * (1 - m) + 0.5 * m)
    rows = [torch.cat([*denormalize(anchors[i]), masked[i], recon[i], denormalize(target[i])], dim=2)
            for i in range(target.shape[0])]
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    image = Image.fromarray((grid * 255).round().astype(np.uint8))
    scale = -(-128 // target.shape[-2])  # small crops (the toy world's 64x64) are enlarged to be seen
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


# -----------------------------------------------------------------------------
# Decoding, cropping and resizing (shared by the CPU and the GPU decode paths)
# -----------------------------------------------------------------------------

# What --decode gpu (torchvision) decodes as the CPU path does: format -> Pillow modes. nvJPEG's
# CMYK, torchvision's 16-bit PNGs (uint16 pixels) and BMP (not decoded) are refused instead.
GPU_MODES = {"JPEG": ("L", "RGB"), "MPO": ("L", "RGB"),  # MPO: a camera's JPEG with a second picture
             "PNG": ("1", "L", "P", "LA", "RGB", "RGBA"), "WEBP": ("RGB", "RGBA")}


def gpu_decode_problem(image, head):
    """None if --decode gpu decodes this opened image as `to_rgb` does, else why not. head:
    the file's first 26 bytes (a PNG's bit depth is byte 24 of its IHDR chunk)."""
    depth = head[24] if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" else 8
    if image.mode in GPU_MODES.get(image.format, ()) and depth <= 8:
        return None
    kind = f"{depth}-bit " if depth > 8 else ""
    return (f"a {kind}{image.format} image in mode {image.mode}, which --decode gpu does not decode as --decode cpu "
            f"does (convert it to 8-bit RGB JPEG or PNG, or train with --decode cpu)")


def gpu_check(image, path):
    """`gpu_decode_problem` of an opened image file (common.check_image's further rule for --decode gpu)."""
    with open(path, "rb") as f:
        return gpu_decode_problem(image, f.read(26))


def map_pixels(pixels, im):
    """Pillow image memory over the H x W x 4 array `pixels` (what Image.frombuffer does for
    RGBX), into which ImageFile.load then decodes; None where this Pillow has no such internal
    (Image.core.map_buffer is not public API), and decode_rgbx copies instead."""
    map_buffer = getattr(Image.core, "map_buffer", None)
    if map_buffer is None:
        return None
    try:
        return map_buffer(pixels, im.size, "raw", 0, ("RGB", 0, 1))
    except (TypeError, ValueError):  # another signature in another Pillow version
        return None


def decode_rgbx(path):
    """A file's pixels as uint8 [4, H, W]: R, G, B and a fourth byte (255), a channels-last view
    of an H x W x 4 array. This is Pillow's own layout for RGB, so an RGB file (any JPEG in
    colour) is decoded straight into the array, without the copy that np.asarray(image) makes;
    and torch's uint8 resize reads 4-byte pixels without repacking them. Other modes are
    converted by `to_rgb`. UnreadableImage if it cannot be decoded or is refused."""
    with open_image(path) as im:
        try:
            pixels = np.empty((im.height, im.width, 4), np.uint8)
            target = map_pixels(pixels, im) if im.mode == "RGB" and im.tile else None
            if target is not None:
                im.im = target
                im.load()
                if im.im is target:
                    return torch.from_numpy(pixels).permute(2, 0, 1)
            rgb = im if im.mode == "RGB" else to_rgb(im, path)
            pixels[..., :3] = np.asarray(rgb)
            pixels[..., 3] = 255
        except UnreadableImage:
            raise
        except Exception as e:  # noqa: BLE001 -- re-raised with the file's name
            raise UnreadableImage(f"{path}: cannot decode image ({e})") from e
    return torch.from_numpy(pixels).permute(2, 0, 1)


def read_encoded(path):
    """A file's bytes as a uint8 tensor, for decoding on the device (--decode gpu), and the
    image's (width, height) from its header. A file whose header does not parse, an image that
    the device would not decode as the CPU path does (`gpu_decode_problem`) or a JPEG without
    its end-of-image marker (truncated) is UnreadableImage, so the worker can substitute its
    bag the way the CPU path does."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UnreadableImage(f"{path}: cannot read image ({e.strerror or e})") from e
    with open_image(io.BytesIO(data), path) as im:
        size, kind, problem = im.size, im.format, gpu_decode_problem(im, data[:26])
    if problem:
        raise UnreadableImage(f"{path}: {problem}")
    if kind == "JPEG" and b"\xff\xd9" not in data[-1024:]:
        raise UnreadableImage(f"{path}: cannot decode image (truncated JPEG: no end-of-image marker)")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), size


def resize_plan(low, high, length, size, max_extra=32, taps=2):
    """How to resample [low, high) of an axis of `length` pixels to `size` samples the way
    Pillow's box resize does (sample i centred at low + (i + 0.5) * scale, scale = (high - low)
    / size) with torch's resize, which centres sample i of a crop starting at a whole pixel x0
    at x0 + (i + 0.5) * scale: resize the crop to extra + size samples and drop the first
    `extra`, with `extra` chosen so that x0 = low - extra * scale falls on a whole pixel and,
    away from the image's edge, the first kept sample's taps lie inside the crop. x0 may be
    negative (the crop then repeats the edge pixel). The residual offset is 0 for a box in whole
    pixels and usually a few hundredths of a pixel otherwise, but up to 0.5 px when the scale
    is within about 1% of a whole number (every `extra` then leaves the same fraction).
    `taps`: the filter's reach in output samples (bicubic 2, bilinear 1). Returns (x0, x1, extra, scale)."""
    scale = (high - low) / size
    support = taps * max(scale, 1.0)  # the filter's reach in source pixels (widened when shrinking)
    best = None
    for extra in range(max_extra + 1):
        start = low - extra * scale
        x0 = round(start)
        taps_inside = x0 <= 0 or low + 0.5 * scale - support + 0.5 >= x0
        # A residual offset of r px moves every sample by r; taps cut at the crop's start or a
        # copied edge (x0 < 0) change the first two samples only: about what r = 0.005 costs.
        cost = abs(start - x0) + (0 if taps_inside else 0.005) + (0.01 if x0 < 0 else 0)
        if best is None or cost < best[0]:
            best = (cost, extra, x0)
        if cost < 1e-9:
            break
    _, extra, x0 = best
    return x0, min(length, math.ceil(high + support) + 1), extra, scale


def crop_axis(image, dim, start, stop):
    """image[start:stop] along dim of an [H, W, C] image; a start below 0 repeats the first row
    or column. (Indexing the channels-last layout keeps it, which torch's fast uint8 resize reads.)"""
    if start >= 0:
        return image.narrow(dim, start, stop - start)
    edge = list(image.shape)
    edge[dim] = -start
    return torch.cat([image.narrow(dim, 0, 1).expand(edge), image.narrow(dim, 0, stop)], dim)


# mode -> (the filter's reach in output samples, the aten op behind F.interpolate(antialias=True))
RESAMPLING = {"bicubic": (2, torch.ops.aten._upsample_bicubic2d_aa),
              "bilinear": (1, torch.ops.aten._upsample_bilinear2d_aa)}


def crop_resize(image, box, size, float_math=None, mode="bicubic"):
    """Crop the box (fractions l, t, r, b) out of image [C, H, W] uint8 (C = 3, or 4: the RGBX
    pixels of `decode_rgbx`) and resize it to [C, size, size] uint8 (on the CPU a channels-last
    view) with antialiased bicubic interpolation (mode "bilinear": antialiased
    bilinear, Pillow's BILINEAR, for --pretext crops and frames): Pillow's filter (a = -0.5) at
    Pillow's sample positions (`resize_plan`), so the crop matches Image.resize(..., box=...)
    also where the box falls between pixels (the other views of a sample, when their size
    differs); docs/training.md gives the measured difference. On the CPU torch's uint8 kernel
    runs; on other devices (or with float_math) the same kernel in float32, rounded. Used by
    both decode paths."""
    taps, resample = RESAMPLING[mode]
    height, width = image.shape[-2:]
    y0, y1, extra_y, scale_y = resize_plan(box[1] * height, box[3] * height, height, size, taps=taps)
    x0, x1, extra_x, scale_x = resize_plan(box[0] * width, box[2] * width, width, size, taps=taps)
    crop = crop_axis(crop_axis(image.permute(1, 2, 0), 0, y0, y1), 1, x0, x1).permute(2, 0, 1).unsqueeze(0)
    # One more sample where the crop is as long as the output: torch copies such an axis as is.
    out_h = extra_y + size + (y1 - y0 == extra_y + size)
    out_w = extra_x + size + (x1 - x0 == extra_x + size)
    # The aten op behind F.interpolate(antialias=True), called with both the output size and
    # the scales, which F.interpolate does not allow together.
    if float_math or (float_math is None and crop.device.type != "cpu"):
        out = resample(crop.float(), [out_h, out_w], False, 1 / scale_y, 1 / scale_x)
        return out[0, :, extra_y:extra_y + size, extra_x:extra_x + size].round_().clamp_(0, 255).to(torch.uint8)
    # The uint8 kernel works on channels-last pixels: given a channels-last output it writes it
    # as is, where a planar one costs it another pass.
    out = torch.empty(1, out_h, out_w, crop.shape[1], dtype=torch.uint8).permute(0, 3, 1, 2)
    resample.out(crop, [out_h, out_w], False, 1 / scale_y, 1 / scale_x, out=out)
    return out[0, :, extra_y:extra_y + size, extra_x:extra_x + size]


def copy_flipped(out, image, flip):
    """out[...] = image [3, H, W], mirrored left-right where `flip`. On the CPU numpy's strided
    copy reads the channels-last crop and writes it planar and mirrored in one pass."""
    if out.device.type == "cpu":
        np.copyto(out.numpy(), image.numpy()[..., ::-1] if flip else image.numpy())
    else:
        out.copy_(image.flip(-1) if flip else image)


def normalize(x, mean, std):
    """uint8 [..., 3, H, W] -> ImageNet-normalised float32 (the same arithmetic as
    `image_to_tensor`: x / 255, minus mean, over std). Runs on the training device."""
    return (x.float() / 255.0 - mean) / std


def image_to_tensor(img):
    """PIL RGB -> ImageNet-normalised float tensor [3, H, W]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def batch_tensor(shape, dtype, shared):
    """An uninitialised batch tensor; where `shared`, in shared memory, as default_collate
    allocates its output inside a DataLoader worker (the main process maps it, no copy)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def collate_batch(batch):
    """The DataLoader's collate_fn on the CPU path: a batch that `BagDataset.__getitems__`
    assembled (a tuple) passes as it is; a list of items goes to default_collate."""
    return batch if isinstance(batch, tuple) else torch.utils.data.default_collate(batch)


def collate_encoded(samples):
    """Collate --decode gpu samples: the bytes of all B x V files in one uint8 tensor (in shared
    memory inside a DataLoader worker) with their lengths [B, V], then the stacked boxes, flips and
    noise. A worker hands each tensor of a batch over as its own shared-memory segment and file
    descriptor: one tensor per file (1,024 for a batch of 256 a3 samples) cost milliseconds each
    and exceeded the usual limit of 1,024 open files, which stalled the loader."""
    blobs, boxes, flips, target_noise, anchor_noise = zip(*samples)
    files = [b for sample in blobs for b in sample]
    data = batch_tensor((sum(len(b) for b in files),), torch.uint8, torch.utils.data.get_worker_info() is not None)
    torch.cat(files, out=data)
    lengths = torch.tensor([[len(b) for b in sample] for sample in blobs], dtype=torch.int64)
    return (data, lengths, torch.stack(boxes), torch.stack(flips), torch.stack(target_noise),
            torch.stack(anchor_noise))


def encoded_files(data, lengths):
    """The files of a collated encoded batch (`collate_encoded`), in order: B * V byte tensors
    (views into `data`), sample by sample."""
    return list(torch.split(data, lengths.flatten().tolist()))


def decode_on_device(blobs, device):
    """--decode gpu: encoded images (uint8 byte tensors) -> [3, H, W] uint8 on `device`.
    JPEGs are decoded in one batch by nvJPEG; other formats by torchvision on the CPU.
    torchvision is imported here only, so the CPU install does not need it."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    is_jpeg = [b[:2].tolist() == [0xFF, 0xD8] for b in blobs]
    jpegs = [b for b, j in zip(blobs, is_jpeg) if j]
    jpegs = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else [])
    return [next(jpegs) if j else decode_image(b, mode=ImageReadMode.RGB).to(device) for b, j in zip(blobs, is_jpeg)]


def assemble_on_device(batch, size, device, decode=decode_on_device, mode="bicubic"):
    """--decode gpu: a batch of encoded samples (see `collate_encoded`; boxes [B, N + 1, 4], each
    image's box, mapped by the workers from the sizes in the files' headers with `image_boxes`)
    -> the uint8 batch that the CPU path delivers: target [B, 3, S, S], anchors [B, N, 3, S, S],
    noise. `decode` maps a list of byte tensors to [3, H, W] uint8 images (injectable: tests
    decode on CPU)."""
    data, lengths, boxes, flips, target_noise, anchor_noise = batch
    per_sample = lengths.shape[1]
    images = decode(encoded_files(data, lengths), device)
    crops = torch.stack([crop_views(images[i * per_sample:(i + 1) * per_sample], boxes[i].tolist(),
                                    bool(flips[i]), size, mode) for i in range(len(lengths))])
    return (crops[:, 0], crops[:, 1:], target_noise.to(device, non_blocking=True),
            anchor_noise.to(device, non_blocking=True))


def assemble_crops_on_device(batch, size, device, decode=decode_on_device):
    """--decode gpu for --pretext crops: a collated batch of CropDataset's encoded samples (one
    file each, the boxes [N + 1, 4]: the global ones, then the local one, flips [N + 1]) -> the
    uint8 batch of the CPU path (see `assemble_on_device`)."""
    data, lengths, boxes, flips, target_noise, anchor_noise = batch
    images = decode(encoded_files(data, lengths), device)  # one file per sample
    views = [cut_crops(image, box[:-1].tolist(), box[-1].tolist(), flip.tolist(), size)
             for image, box, flip in zip(images, boxes, flips)]
    return (torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views]),
            target_noise.to(device, non_blocking=True), anchor_noise.to(device, non_blocking=True))


# -----------------------------------------------------------------------------
# Checkpoints of the MAE family: an encoder from MAE, DINO, CropMAE or CDG-MAE weights
# -----------------------------------------------------------------------------

DECODER_PREFIXES = ("decoder_", "mask_token")  # MAE, CropMAE and CDG-MAE decoder parameters
HEAD_PREFIXES = ("head.", "fc_norm.")          # classification / DINO projection heads


def load_checkpoint(path):
    """torch.load with weights_only=True (no arbitrary code), allowing the argparse.Namespace
    that MAE's and CropMAE's training checkpoints store under "args". A folder is a
    InputError, a missing file FileNotFoundError, a file torch.load cannot read (an image,
    a truncated archive, a pickle of other objects) RuntimeError, each naming the path."""
    path = Path(path)
    if path.is_dir():
        kind = "a diffusion model folder" if any((path / n).exists() for n in DIFFUSION_FOLDER_FILES) else "a folder"
        raise InputError(f"{path}: {kind}, not a checkpoint file (give the checkpoint file itself, a .pth "
                              f"written by torch.save)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- re-raised with the file's name and what the file is
        raise RuntimeError(f"{path}: cannot read checkpoint ({unreadable_checkpoint_reason(path, e)})") from e


def unreadable_checkpoint_reason(path, error):
    """Why torch.load failed on a file, in a few words: what the file is where that explains it."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # torch.save's zip archive
        return f"a torch.save archive that is truncated or damaged: {first_line(error)}"
    try:
        with Image.open(path) as image:
            return f"a {image.format} image, not a checkpoint"
    except Exception:  # noqa: BLE001 -- not an image either
        pass
    text = str(error)
    if "WeightsUnpickler error:" in text:  # torch's advice is pages long; its reason is the line after
        return "weights_only loading refuses it: " + first_line(text.split("WeightsUnpickler error:", 1)[1])
    return first_line(error)


def read_state_dict(path):
    """Load a checkpoint file and unwrap it to a flat state dict of tensors.

    Understands {"model": sd} (MAE, CropMAE, CDG-MAE), {"state_dict": sd}, DINO's training
    checkpoints {"teacher": sd} and plain state dicts (DINO's released backbones), and
    strips the "module." (DDP) and "backbone." (DINO) prefixes.
    """
    return unwrap_state_dict(load_checkpoint(path), str(path))


def unwrap_state_dict(ckpt, name="checkpoint"):
    if not isinstance(ckpt, dict):
        raise ValueError(f"{name}: expected a dict, got {type(ckpt).__name__}")
    for key in ("model", "state_dict", "teacher"):
        if key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    state = {}
    for k, v in ckpt.items():
        if not torch.is_tensor(v):
            continue
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    if not state:
        raise ValueError(f"{name}: no tensors found")
    return state


def non_finite_tensor(state):
    """(name, count) of the first floating-point tensor of a {name: tensor} dict that holds
    NaN or infinite values, or None."""
    for key, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return key, int((~torch.isfinite(tensor)).sum())
    return None


def check_finite(state, name, what_to_do="use a checkpoint saved before the training diverged"):
    """InputError naming the first tensor of `state` that holds NaN or infinite values:
    such weights would turn every feature, similarity, loss or prediction into NaN."""
    if (bad := non_finite_tensor(state)):
        key, count = bad
        raise InputError(f"{name}: {key} holds {count} NaN or infinite value{'s' * (count > 1)} of "
                              f"{state[key].numel()} ({what_to_do})")


def load_encoder_state(encoder, state, name="checkpoint"):
    """Load an encoder state dict strictly into a VisionTransformer.

    Decoder keys (decoder_*, mask_token) and heads (head.*, fc_norm.*) are dropped; the
    position embedding is interpolated if the checkpoint's grid differs from the
    encoder's. Any other missing or unexpected key is an error that lists the keys; a tensor
    holding NaN or infinite values is a InputError naming it. Returns the dropped keys.
    """
    dropped = sorted(k for k in state if k.startswith(DECODER_PREFIXES + HEAD_PREFIXES))
    state = {k: v for k, v in state.items() if k not in dropped}
    check_finite(state, name)
    if "pos_embed" in state and state["pos_embed"].shape != encoder.pos_embed.shape:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], encoder.grid_size, encoder.grid_size)
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        lines = [f"{name}: does not match the encoder ({encoder.embed_dim}-d, {encoder.depth} blocks, "
                 f"patch {encoder.patch_size})"]
        if missing:
            lines.append(f"  missing keys: {missing}")
        if unexpected:
            lines.append(f"  unexpected keys: {unexpected}")
        for k in wrong_shape:
            lines.append(f"  {k}: checkpoint {tuple(state[k].shape)} vs encoder {tuple(expected[k].shape)}")
        raise ValueError("\n".join(lines))
    encoder.load_state_dict(state, strict=True)
    return dropped


def encoder_from_checkpoint(checkpoint, img_size=None, num_heads=None, name=None):
    """Build a VisionTransformer shaped like a checkpoint's encoder and load it strictly.

    checkpoint: a path or an already loaded dict. Width, depth and patch size are read off
    the tensors; img_size defaults to the stored position-embedding grid x patch size (so
    the embedding is resized once, to each input's grid, and never twice); heads come from
    `num_heads` (the commands' --num-heads), else the checkpoint's args["num_heads"], else
    the ViT convention of 64 channels per head (ViT-T/S/B: 3/6/12). Heads that do not divide
    the width, and weights holding NaN or infinite values, are a InputError. name: what
    the messages call a loaded dict (default "checkpoint").
    """
    name = name or ("checkpoint" if isinstance(checkpoint, dict) else str(checkpoint))
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    state = unwrap_state_dict(ckpt, name)
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError(f"{name}: no patch_embed.proj.weight / pos_embed, not a ViT checkpoint")
    embed_dim, _, patch_size, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    if num_heads:
        heads, source = num_heads, f"--num-heads {num_heads}"
    elif args.get("num_heads"):
        heads, source = args["num_heads"], f"num_heads {args['num_heads']} (the checkpoint's args)"
    else:
        heads = max(1, embed_dim // 64)
        source = f"{heads} heads (width / 64)"
    if not isinstance(heads, int) or heads < 1 or embed_dim % heads:
        divisors = ", ".join(str(d) for d in range(1, embed_dim + 1) if embed_dim % d == 0)
        raise InputError(f"{name}: {source} does not divide the encoder width {embed_dim} "
                              f"(give --num-heads one of {divisors})")
    img_size = img_size or math.isqrt(state["pos_embed"].shape[1] - 1) * patch_size
    encoder = VisionTransformer(img_size, patch_size, embed_dim, depth, heads)
    load_encoder_state(encoder, state, name)
    return encoder


# -----------------------------------------------------------------------------
# The run folder: one run per --output, resumed only with the settings it was made with
# -----------------------------------------------------------------------------

RUN_FILES = ("checkpoint-last.pth", "log.jsonl", "args.json")  # a folder holding any of them holds a run

# Settings that change what a run computes, besides the model's (model_config). The others
# (workers, verification, cadence of logs, pictures and checkpoints, --max-steps, --compile,
# --dist-timeout) may differ on resume; --epochs only once the run has finished its epochs;
# --local-scale counts for --pretext crops only.
RESULT_SETTINGS = ("pretext", "input_size", "crop_scale", "crop_ratio", "local_scale", "target_view", "views",
                   "batch_size", "accum_iter", "lr", "min_lr", "warmup_epochs", "weight_decay", "betas", "seed",
                   "decode", "data", "bags")
FLAG_NAMES = {"num_anchors": "--anchors", "anchor_mask_ratio": "--anchor-mask", "target_mask_ratio": "--target-mask",
              "img_size": "--input-size", "decoder_embed_dim": "--decoder-dim", "decoder_num_heads": "--decoder-heads",
              "bags": "the bag list"}


def run_settings(args):
    """What args.json and a checkpoint record: every flag (plain values; --data as its real path,
    so that a resume started from another working folder compares the same folder), the model's
    constructor arguments, and after the scan the bag count and list fingerprint."""
    settings = {**{k: plain(v) for k, v in vars(args).items()}, **model_config(args)}
    settings["data"] = os.path.realpath(args.data)
    return settings


def settings_differences(args, stored, finished=False):
    """['--flag old -> new', ...]: the stored settings that the command line would change and
    that change what the run computes. Keys a run did not record (older versions) and keys
    not known yet (views and bags before the scan) are skipped. `finished`: the stored run
    has done all its epochs, so --epochs may grow (the cosine of the new length then sets
    the lr from the resumed step on)."""
    current, differences = run_settings(args), {}
    for key in RESULT_SETTINGS + tuple(model_config(args)):
        if key not in stored or current.get(key) is None or key == "local_scale" and current["pretext"] != "crops":
            continue
        old, new = stored[key], current[key]
        if key == "data":
            old, new = os.path.realpath(old), os.path.realpath(new)
        if old != new:
            flag = FLAG_NAMES.get(key, "--" + key.replace("_", "-"))
            differences.setdefault(flag, f"{flag} {stored[key]} -> {current[key]}")
    if stored.get("epochs", args.epochs) != args.epochs and not finished:
        differences["--epochs"] = (f"--epochs {stored['epochs']} -> {args.epochs} (the cosine's length: it sets "
                                   "the lr of every remaining step; extend a run once it has finished)")
    return list(differences.values())


def find_resume(args, output):
    """The checkpoint to resume from, or None for a fresh start. Refuses to start a new run in
    a folder that holds another one (unless resuming it) and a --resume that names a
    checkpoint outside such a folder."""
    existing = [name for name in RUN_FILES if (output / name).exists()]
    if args.resume is None:
        if existing:
            raise SystemExit(f"{output}: holds another run ({', '.join(existing)}) "
                             "(continue it with --resume auto, or choose another --output)")
        return None
    if args.resume == "auto":
        last = output / "checkpoint-last.pth"
        return last if last.exists() else None
    path = Path(args.resume)
    if path.is_dir():
        raise SystemExit(f"{path}: a folder, not a checkpoint file (--resume takes a checkpoint file, e.g. "
                         f"{path / 'checkpoint-last.pth'}, or 'auto')")
    if not path.is_file():
        raise SystemExit(f"{path}: checkpoint not found (--resume takes a checkpoint file or 'auto')")
    if existing and path.resolve().parent != output.resolve():
        raise SystemExit(f"{output}: holds another run ({', '.join(existing)}) and --resume {path} is not one of "
                         "its checkpoints (resume into an empty --output, or use --resume auto)")
    return path


def read_training_checkpoint(path):
    """A checkpoint written by this script, or a one-line exit naming the file: unreadable, of
    another script, or holding NaN or infinite weights or optimizer moments."""
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"{first_line(e)} (--resume needs a checkpoint that cdgmae.py wrote)") from None
    missing = [k for k in ("model", "optimizer", "next_epoch", "next_step", "global_step", "args")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or not isinstance(ckpt["model"], dict) or not isinstance(ckpt["optimizer"], dict):
        raise SystemExit(f"{path}: not a cdgmae.py training checkpoint (no {', '.join(missing) or 'state dicts'}) "
                         "(--resume continues a run of this script; it does not load other weights)")
    moments = {f"optimizer state {index}.{name}": value for index, state in ckpt["optimizer"].get("state", {}).items()
               if isinstance(state, dict) for name, value in state.items()}
    try:
        check_finite({**ckpt["model"], **moments}, path, "the run had diverged when this checkpoint was saved: "
                     "resume from an earlier checkpoint-EEEE.pth")
    except InputError as e:
        raise SystemExit(str(e)) from None
    return ckpt


def check_resume_fits(args, ckpt, path):
    """Exit with one line, before any work, if the checkpoint's weights do not fit the model
    that this command line builds (a hand-made checkpoint whose recorded settings match but
    whose tensors do not: another width, depth or decoder). The model is built on the meta
    device: shapes only, no memory."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in CDGMAE(**model_config(args)).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in ckpt["model"].items() if torch.is_tensor(v)}
    differ = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
    if differ:
        k = differ[0]
        raise SystemExit(f"{path}: its weights do not fit this run's model ({len(differ)} tensor(s) differ, e.g. {k}: "
                         f"checkpoint {found.get(k, 'absent')}, model {expected.get(k, 'absent')}) "
                         "(--resume needs a checkpoint of this run, with its settings)")


def refuse_changed_settings(args, ckpt, resume, output):
    """Exit, listing the differences, if resuming would change what the run computes. Without
    a checkpoint, --resume auto compares with OUTPUT/args.json (a run killed before its first
    checkpoint restarts from scratch, but only with its own settings)."""
    if ckpt is not None:
        stored, source = ckpt["args"], resume
        finished = ckpt["next_epoch"] >= stored.get("epochs", math.inf)
    elif args.resume == "auto" and (output / "args.json").exists():
        source, finished = output / "args.json", False
        try:
            stored = json.loads(source.read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"{source}: cannot read ({first_line(e)}) (remove it to start the run afresh)") from None
    else:
        return
    differences = settings_differences(args, stored, finished)
    if differences:
        raise SystemExit(f"{source}: the run was made with other settings, and resuming would change what it "
                         f"computes: {'; '.join(differences)} (resume with the run's settings, or start a new "
                         "run in another --output)")


def truncate_log(path, last_step):
    """Keep the log records of steps <= last_step (those in the checkpoint resumed from), so the
    resumed run appends after them and no step is logged twice. A line cut by a kill is dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line + "\n")
    write_or_exit(path, lambda tmp: Path(tmp).write_text("".join(kept)), "the log")


# -----------------------------------------------------------------------------
# Temporary files and atomic writes
# -----------------------------------------------------------------------------



# -----------------------------------------------------------------------------
# Start-up: list and check the data, split over ranks and processes, cached
# -----------------------------------------------------------------------------

VERIFY_LEVELS = ("none", "header", "decode")  # --verify-images, from cheapest to most thorough
EXPECTED_LAYOUT = {"bags": "a bag is a folder holding real.* and view_NN.jpg files",
                   "crops": f"--pretext crops reads the image files ({', '.join(IMAGE_SUFFIXES)}) at any depth",
                   "frames": "--pretext frames reads ROOT/<video>/<frame>.jpg: a video is a folder holding images"}


def check_data_root(args):
    """A missing --data folder (bags, or the images / videos of --pretext crops / frames) is a
    one-line exit saying what it should hold and, for bags, how to make them."""
    root = Path(args.data)
    if root.is_dir():
        return
    if args.pretext != "bags":
        what = "image folder" if args.pretext == "crops" else "folder of frame folders"
        raise SystemExit(f"{root}: {what} not found (--pretext {args.pretext} reads the "
                         f"{'images' if args.pretext == 'crops' else 'videos, one folder of frames each,'} under --data)")
    if args.data == DEFAULT_DATA:
        raise SystemExit(f"{root}: no bag folder (the default --data, relative to the working folder; make one with "
                         f"`python generate_views.py --images IMAGES --model SLDM --output {root}`, toy bags with "
                         f"`python toyworld.py bags --output {root}`, or pass --data BAGS)")
    raise SystemExit(f"{root}: bag folder not found (--data takes the folder written by generate_views.py "
                     "or `toyworld.py bags`)")


def _bag_problem(job):
    """(bag, reason or None) for one bag; see check_bags."""
    root, bag, num_views, min_views, level, decode = job
    real, views = bag_files(Path(root) / bag)
    if real is None:
        return bag, "no real.* image"
    indices = [int(VIEW_NAME.match(os.path.basename(v)).group(1)) for v in views]
    if indices[:num_views] != list(range(num_views)):
        return bag, f"incomplete: has views {indices}, needs view_00..view_{num_views - 1:02d}"
    if 1 + num_views < min_views:
        return bag, f"{1 + num_views} images, needs at least {min_views}"
    if level != "none":
        for path in [real] + views[:num_views]:
            if (problem := image_problem(path, level, gpu_check if decode == "gpu" else None)):
                return bag, f"{os.path.basename(path)}: {problem}"
    return bag, None


def start_method():
    """How the start-up scan starts its processes: forked, unless CUDA is initialised (a forked
    child of a process that has started CUDA cannot use it, and may hang)."""
    return "forkserver" if torch.cuda.is_initialized() else "fork"


def check_bags(root, bags, num_views, min_views, verify_images="header", processes=1, decode="cpu"):
    """Problems of the given bags as {bag: reason}: no real image, views missing among
    view_00..view_{num_views-1}, fewer than `min_views` images in all, or an image that
    cannot be read or that the loader of `decode` ("cpu" or "gpu") would refuse (verify_images
    "header": its header and mode; "decode": all of it; "none": no image is opened; see
    `check_image`). The bags are split over `processes` worker processes."""
    level = {True: "header", False: "none"}.get(verify_images, verify_images)
    jobs = [(str(root), bag, num_views, min_views, level, decode) for bag in bags]
    return {bag: reason for bag, reason in parallel_map(_bag_problem, jobs, processes, start_method=start_method()) if reason}


def _item_problem(job):
    """(item, reason or None) for one image (--pretext crops) or video (frames); see check_items."""
    root, item, pretext, level, decode = job
    path = Path(root) / item
    paths = [path] if pretext == "crops" else list_files(path)
    if pretext == "frames" and len(paths) < FRAME_GAP[0] + 1:
        return item, f"{len(paths)} frames, needs at least {FRAME_GAP[0] + 1} (a gap of {FRAME_GAP[0]} frames)"
    if level != "none":
        for frame in paths:
            if (problem := image_problem(frame, level, gpu_check if decode == "gpu" else None)):
                return item, problem if pretext == "crops" else f"{os.path.basename(frame)}: {problem}"
    return item, None


def check_items(root, items, pretext, verify_images="header", processes=1, decode="cpu"):
    """check_bags for --pretext crops (each image opens) and frames (each video has at least 5
    frames and each frame opens): {item: reason}."""
    jobs = [(str(root), item, pretext, verify_images, decode) for item in items]
    return {item: reason for item, reason in parallel_map(_item_problem, jobs, processes, start_method=start_method()) if reason}


def bag_index_key(args):
    """What the cached bag list depends on: the folder, the modification times of the root and
    of its top-level folders (adding or removing a bag changes its parent's), and the flags that
    decide which bags are usable. A file replaced inside a bag is not seen (see docs/training.md)."""
    root = Path(args.data)
    stamps = [(name, (root / name).stat().st_mtime_ns) for name in top_level_entries(root)[0]]
    return {"data": os.path.realpath(root), "root_mtime_ns": root.stat().st_mtime_ns,
            "folders": hashlib.sha1(json.dumps(stamps).encode()).hexdigest(),
            "views": args.views, "anchors": args.anchors, "target_view": args.target_view, "pretext": args.pretext,
            "decode": args.decode}


def read_bag_index(path, key, level):
    """(bags, num_views) from OUTPUT/bag-index.json if it was made for `key` and checked at
    `level` or more thoroughly; None otherwise."""
    try:
        index = json.loads(path.read_text())
        verified = VERIFY_LEVELS.index(index["verified"])
        if index["key"] != key or verified < VERIFY_LEVELS.index(level):
            return None
        return index["bags"], index["num_views"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def scan_bag_root(args, rank, world_size, output):
    """List the bags and check every one (both split over ranks and over --workers processes
    per rank), or reuse OUTPUT/bag-index.json when nothing it depends on changed. Fails with
    the bags' names before any training if one cannot be used. Returns (bags, num_views).
    --pretext crops / frames: the images / videos instead (`check_items`), num_views None."""
    cache, key = output / "bag-index.json", bag_index_key(args)
    cached = read_bag_index(cache, key, args.verify_images)
    if world_size > 1 and not all(gather([cached is not None], world_size)):
        cached = None  # every rank uses the cache, or none does
    if cached:
        return cached
    processes, item = max(1, args.workers), PRETEXT_ITEMS[args.pretext]
    bags = sorted(gather(find_bags(args.data, rank, world_size, processes, args.pretext, start_method()), world_size))
    if not bags:
        raise SystemExit(f"{args.data}: no {item}s found ({EXPECTED_LAYOUT[args.pretext]})")
    refuse_line_breaks(args.data, bags, item)
    num_views, setting = None, ""
    if args.pretext == "bags":
        num_views = args.views or max(len(bag_files(Path(args.data) / b)[1]) for b in bags[:1000])
        setting = f" (M = {num_views} views, N = {args.anchors} anchors)"
        problems = check_bags(args.data, bags[rank::world_size], num_views, 1 + args.anchors,
                              args.verify_images, processes, args.decode)
    else:
        problems = check_items(args.data, bags[rank::world_size], args.pretext, args.verify_images, processes,
                               args.decode)
    problems = dict(gather(problems.items(), world_size))
    if args.pretext == "bags" and args.target_view == "real" and num_views < args.anchors:
        problems["(all)"] = f"--target-view real needs at least {args.anchors} generated views, bags have {num_views}"
    if problems:
        listed = sorted(problems.items())
        if rank == 0:  # one "item<TAB>reason" a line
            text = "".join(f"{b}\t{' '.join(why.split())}\n" for b, why in listed)
            output.mkdir(parents=True, exist_ok=True)
            write_or_exit(output / f"{item}-problems.txt", lambda tmp: Path(tmp).write_text(text), "a list")
        shown = "; ".join(f"{bag}: {why}" for bag, why in listed[:3])
        raise SystemExit(f"{args.data}: {len(problems)} of {len(bags)} {item}s cannot be used{setting}: "
                         f"{shown}{' ...' if len(listed) > 3 else ''} "
                         f"(fix or remove them; all are listed in {output / f'{item}-problems.txt'})")
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        index = {"key": key, "verified": args.verify_images, "num_views": num_views, "bags": bags}
        write_or_exit(cache, lambda tmp: Path(tmp).write_text(json.dumps(index)), "the bag index")
    return bags, num_views


def bag_list_id(bags, item="bag"):
    """'<count> bags, sha1 <12 hex>': recorded with the run, so a resume on another bag list is refused."""
    return f"{len(bags)} {item}s, sha1 {hashlib.sha1(chr(10).join(bags).encode()).hexdigest()[:12]}"


# -----------------------------------------------------------------------------
# Distributed set-up (torchrun: NCCL on CUDA, gloo on CPU)
# -----------------------------------------------------------------------------



def setup_distributed(rank, world_size, local_rank, timeout_minutes=30):
    """The process's device, and with several ranks (torchrun: `torchrun_environment`) the process
    group: NCCL on CUDA, gloo on CPU. No collective waits longer than `timeout_minutes`
    (--dist-timeout): a rank that dies or stalls stops the others with an error instead of
    leaving them waiting. A launch that cannot work is a one-line exit."""
    if world_size > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise SystemExit(f"WORLD_SIZE={world_size}: MASTER_ADDR and MASTER_PORT are not set, so the ranks cannot "
                         f"meet (start the processes with torchrun, or unset WORLD_SIZE and RANK to run one)")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"LOCAL_RANK={local_rank}: this machine has {torch.cuda.device_count()} CUDA devices "
                             f"(start at most {torch.cuda.device_count()} processes per machine)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return device


def model_for_training(model, world_size, device, compile_model=False):
    """The module the steps call: `model` wrapped in DistributedDataParallel over several ranks
    and compiled with --compile (the checkpoints keep saving `model` itself). On CUDA, float32
    matrix products may use TF32 (the forward runs under bf16 autocast there; on the CPU it
    runs in float32, where bf16 is ~30x slower)."""
    train_model = model
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        train_model = torch.compile(train_model)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return train_model

def gather(part, world_size):
    """The concatenation of every rank's list (bounded by --dist-timeout)."""
    if world_size == 1:
        return list(part)
    parts = [None] * world_size
    dist.all_gather_object(parts, list(part))
    return [item for p in parts for item in p]


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

DEFAULT_DATA = "data/bags"  # --data default, relative to the working folder (the docstring's torchrun usage names none)
SEED_MAX = 2 ** 32 - 1  # torch's seed of a step, seed * 1_000_003 + ..., must stay below 2^64


def get_args_parser():
    """The command line; each argument group is added by its own function, in --help's order."""
    p = argparse.ArgumentParser(
        description="CDG-MAE pre-training on bags of views (defaults: the paper's single-anchor "
                    "setting, Table 6), or on the family's other pretext data (--pretext crops: CropMAE, "
                    "frames: SiamMAE). Run with python (one process) or torchrun (DDP).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_arguments(p.add_argument_group("data"))
    add_model_arguments(p.add_argument_group("model"))
    add_optimisation_arguments(p.add_argument_group("optimisation"))
    add_output_arguments(p.add_argument_group("output"))
    return p


def add_data_arguments(g):
    """The "data" flags: --data, --pretext, the views and their crops, the loader and the start-up check."""
    g.add_argument("--data", type=str, default=DEFAULT_DATA,
                   help="bag root (layout: see docs/training.md, 'Bags of views on disk'; relative to the working folder); "
                        "--pretext crops: an image folder, frames: a folder of frame folders")
    g.add_argument("--pretext", choices=PRETEXTS, default="bags",
                   help="bags: target and anchors among a bag's views (the paper); crops: CropMAE's global crop "
                        "as anchor, a crop of it as target; frames: SiamMAE's frames 4 to 48 apart "
                        "(see docs/training.md, 'Pretext data')")
    g.add_argument("--views", type=checked(int, 1), default=None,
                   help="M generated views per bag to use (default: the largest count in the first 1000 bags; "
                        "a bag with fewer is an error)")
    g.add_argument("--target-view", choices=["any", "real", "generated"], default="any",
                   help="target chosen among all views of the bag / always the real image / "
                        "always a generated view (Table 2)")
    g.add_argument("--input-size", type=checked(int, 1), default=224, help="side of the square training crops (pixels)")
    g.add_argument("--crop-scale", type=checked(float, 0, 1, low_open=True), nargs=2, default=None,
                   help="random resized crop area (when not given: 0.5 1.0; --pretext crops, the global crop's: 0.10 1.0)")
    g.add_argument("--crop-ratio", type=checked(float, 0, low_open=True), nargs=2, default=None,
                   help="crop aspect ratio range (when not given: 0.75 1.33; --pretext crops and frames: 3/4 4/3)")
    g.add_argument("--local-scale", type=checked(float, 0, 1, low_open=True), nargs=2, default=(0.3, 0.6),
                   help="--pretext crops: the target's area as a fraction of the global crop (CropMAE)")
    g.add_argument("--workers", type=checked(int, 0), default=8, help="DataLoader worker processes per rank")
    g.add_argument("--verify-images", choices=VERIFY_LEVELS, default="header",
                   help="at start-up, open every image's header or decode every image (split over ranks "
                        "and --workers processes; the result is cached in OUTPUT/bag-index.json)")
    g.add_argument("--no-verify-images", dest="verify_images", action="store_const", const="none",
                   help="same as --verify-images none")
    g.add_argument("--decode", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: workers decode, crop and resize; gpu: workers read the files' bytes and draw "
                        "the boxes, the GPU decodes (nvJPEG, needs torchvision) and crops"
                        " (pixels differ slightly from cpu's, so a run keeps its choice)")


def add_model_arguments(g):
    """The "model" flags: the encoder, the anchors and masks (Eq. 4-7), the decoder (Sec. 4) and the loss."""
    g.add_argument("--model", choices=sorted(VIT_SIZES), default="vit_small", help="encoder size")
    g.add_argument("--embed-dim", type=checked(int, 1), default=None, help="override the encoder width")
    g.add_argument("--depth", type=checked(int, 1), default=None, help="override the encoder depth")
    g.add_argument("--num-heads", type=checked(int, 1), default=None, help="override the encoder heads")
    g.add_argument("--patch-size", type=checked(int, 1), default=16, help="ViT patch size P (16: ViT-S/16, 8: ViT-S/8)")
    g.add_argument("--anchors", type=checked(int, 1), default=1,
                   help="N anchors per target (Eq. 6-7; Table 6's single-anchor default; CDG-MAE-a3: 3)")
    g.add_argument("--anchor-mask", type=checked(float, 0, 1, high_open=True), default=0.0,
                   help="anchor mask ratio r_a (Eq. 6; Table 6: 0; CDG-MAE-a3: 0.25)")
    g.add_argument("--target-mask", type=checked(float, 0, 1, low_open=True, high_open=True), default=None,
                   help="target mask ratio r_t (Eq. 4; when not given: 0.9; --pretext crops 0.985 as CropMAE, frames 0.95 "
                        "as SiamMAE)")
    g.add_argument("--decoder-dim", type=checked(int, 1), default=256, help="decoder width (Sec. 4)")
    g.add_argument("--decoder-depth", type=checked(int, 1), default=4, help="decoder blocks (Sec. 4)")
    g.add_argument("--decoder-heads", type=checked(int, 1), default=8, help="decoder attention heads")
    g.add_argument("--decoder-ffn-dim", type=checked(int, 1), default=2048, help="decoder feed-forward width (CropMAE)")
    g.add_argument("--decoder-dropout", type=checked(float, 0, 1, high_open=True), default=0.1, help="decoder dropout (CropMAE)")
    g.add_argument("--decoder-block", choices=["cdgmae", "croco"], default="cdgmae",
                   help="decoder block: the paper's (CropMAE's post-norm cross-attn, FFN, self-attn) or "
                        "CroCo's pre-norm self-attn, cross-attn, MLP with memory position embeddings "
                        "(MLP ratio 4, no dropout: --decoder-ffn-dim/--decoder-dropout do not apply)")
    g.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="regress per-patch normalised pixels")


def add_optimisation_arguments(g):
    """The "optimisation" flags: AdamW, the lr schedule and the batch (Table 6), the seed."""
    g.add_argument("--epochs", type=checked(int, 1), default=100, help="passes over the bags (Table 6) and the cosine's length: a resume may raise it only once the run has finished")
    g.add_argument("--batch-size", type=checked(int, 1), default=2048, help="global batch (all ranks, all accumulation steps)")
    g.add_argument("--accum-iter", type=checked(int, 1), default=1, help="gradient accumulation steps per optimizer step")
    g.add_argument("--blr", type=checked(float, 0, low_open=True), default=1.5e-4, help="base lr; lr = blr * batch_size / 256")
    g.add_argument("--lr", type=checked(float, 0, low_open=True), default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--min-lr", type=checked(float, 0), default=0.0, help="lr at the end of the cosine")
    g.add_argument("--warmup-epochs", type=checked(float, 0), default=5, help="linear warmup (CropMAE: 5%% of 100 epochs)")
    g.add_argument("--weight-decay", type=checked(float, 0), default=0.05, help="AdamW weight decay (Table 6)")
    g.add_argument("--betas", type=checked(float, 0, 1, high_open=True), nargs=2, default=(0.9, 0.95), help="AdamW betas (Table 6)")
    g.add_argument("--seed", type=checked(int, 0, SEED_MAX), default=0,
                   help="seeds the initial weights, the data order and every sample's crop, views and masks (0..2^32-1)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    g.add_argument("--max-steps", type=checked(int, 1), default=None, help="stop (with a checkpoint) after this many optimizer steps")


def add_output_arguments(g):
    """The "output" flags: the run folder, resuming, the cadence of checkpoints, logs and pictures."""
    g.add_argument("--output", type=str, default="runs/cdgmae", help="folder for checkpoints, log.jsonl, args.json and reconstruction PNGs")
    g.add_argument("--resume", type=str, default=None, help="checkpoint to continue from ('auto': OUTPUT/checkpoint-last.pth if present); refused if a setting "
                        "that changes the computation differs")
    g.add_argument("--save-every", type=checked(int, 1), default=25, help="keep a copy of the checkpoint every this many epochs")
    g.add_argument("--vis-every", type=checked(int, 0), default=5, help="reconstruction PNG every this many epochs (0: never)")
    g.add_argument("--log-every", type=checked(int, 1), default=20, help="JSON-lines log every this many steps")
    # At most 10^6 minutes (two years): a datetime.timedelta of 1.5e12 minutes overflows.
    g.add_argument("--dist-timeout", type=checked(float, 0, 10 ** 6, low_open=True), default=30,
                   help="minutes any rank may wait in a collective (start-up scan, loss average) before the "
                        "run stops with an error instead of hanging")
    g.add_argument("--count-flops", action="store_true",
                   help="print the GFLOPs of one 224x224 training sample (Table 8) and exit")


def check_args(parser, args):
    """Checks that involve several flags, right after parsing (parser.error: one line, exit 2);
    fills in the pretext's defaults of the flags not given."""
    for name in PRETEXT_DEFAULTS[args.pretext]:
        setattr(args, name, pretext_default(args, name))
    width, _, heads = VIT_SIZES[args.model]
    width, heads = args.embed_dim or width, args.num_heads or heads
    if args.input_size % args.patch_size:
        parser.error(f"argument --input-size: {args.input_size} is not divisible by --patch-size {args.patch_size}")
    for width_flag, width, heads_flag, heads in (("--embed-dim", width, "--num-heads", heads),
                                                 ("--decoder-dim", args.decoder_dim, "--decoder-heads", args.decoder_heads)):
        if width % heads:
            parser.error(f"argument {heads_flag}: {heads} heads do not divide the width {width} ({width_flag})")
        if width % 4:
            parser.error(f"argument {width_flag}: {width} is not divisible by 4 (sine-cosine position embedding)")
    for flag, (low, high) in (("--crop-scale", args.crop_scale), ("--crop-ratio", args.crop_ratio),
                              ("--local-scale", args.local_scale)):
        if low > high:
            parser.error(f"argument {flag}: {low:g} {high:g} is not LOW <= HIGH")
    if args.batch_size % args.accum_iter:
        parser.error(f"argument --accum-iter: {args.accum_iter} does not divide --batch-size {args.batch_size}")
    if args.min_lr > peak_lr(args):  # the cosine would raise the lr from its peak to its "minimum"
        parser.error(f"argument --min-lr: {args.min_lr:g} is above the peak lr {peak_lr(args):g} "
                     f"({'--lr' if args.lr is not None else '--blr x --batch-size / 256'})")


def peak_lr(args):
    """The lr at the end of the warmup: --lr, else --blr x --batch-size / 256 (MAE's scaling rule)."""
    return args.lr if args.lr is not None else args.blr * args.batch_size / 256


def model_config(args):
    """The CDGMAE constructor arguments implied by the command line (sizes resolved)."""
    embed_dim, depth, num_heads = VIT_SIZES[args.model]
    return dict(num_anchors=args.anchors, anchor_mask_ratio=args.anchor_mask,
                target_mask_ratio=pretext_default(args, "target_mask"), img_size=args.input_size, patch_size=args.patch_size,
                embed_dim=args.embed_dim or embed_dim, depth=args.depth or depth,
                num_heads=args.num_heads or num_heads, decoder_embed_dim=args.decoder_dim,
                decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_heads,
                decoder_ffn_dim=args.decoder_ffn_dim, decoder_dropout=args.decoder_dropout,
                norm_pix_loss=args.norm_pix_loss, decoder_block=args.decoder_block)


if __name__ == "__main__":
    run_command(main, resume="rerun with --resume auto to resume")
