"""CDG-MAE pre-training: a cross-view MAE on bags of diffusion-generated views (Belagali et al.).

Read it with the paper open. The method comes first, in the paper's order, in one stretch:
  1. The model (Sec. 3.3, Eq. 4-10): one ViT encoder for the target and the N anchors, MAE's
     random masking, a decoder that cross-attends to the anchors, the loss on masked patches.
  2. The sample (Sec. 3.1): one bag of views -> a target and N anchors, one crop box, one flip.
  3. The step and the epoch loop (Sec. 4, Table 6): AdamW, warmup then cosine, as MAE trains.
Then what the paper compares with and measures: 4. CroCo's decoder block, the FLOPs of Table 8,
CropMAE's crops and SiamMAE's frames (Table 5). Then 5. the run: checkpoints and encoders of
the MAE family, --decode gpu, the run folder and its resume checks, the start-up scan of the
data, torchrun/DDP and the command line. Sections 1-3 need torch, numpy and, to read images,
common.py: the plumbing every script shares (flags, one-line errors, atomic writes, settings
records, images of every mode), which a reader of the method can skip.

Usage:
    torchrun --nproc_per_node 8 cdgmae.py --anchors 3 --anchor-mask 0.25   # CDG-MAE-a3, bags in ./data/bags
    python cdgmae.py --data BAGS --output runs/a1 [--resume auto]           # one process; continue a run
    python cdgmae.py --count-flops --anchors 3 --anchor-mask 0.25           # Table 8's GFLOPs

Import:
    from cdgmae import CDGMAE
    loss, pred, mask = CDGMAE(num_anchors=3, anchor_mask_ratio=0.25)(target, anchors)  # [B,3,H,W], [B,N,3,H,W]
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

from common import (DIFFUSION_FOLDER_FILES, IMAGE_SUFFIXES, VERIFY_LEVELS, HelpFormatter, InputError, UnreadableImage,
                    bag_files, check_bags, check_items, check_output_folder, check_outside, checked, find_bags,
                    first_line, gpu_check, gpu_decode_problem, is_real_image, list_files, list_fingerprint, one_line,
                    open_image, plain, read_bag_index, read_record, refuse_line_breaks, refuse_other_settings,
                    remove_stale_temporaries, run_command, to_rgb, top_level_entries, torchrun_environment,
                    truncate_log, write_or_exit)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# =============================================================================
# 1. The model (Sec. 3.3, Eq. 4-10)
# =============================================================================

def sincos_pos_embed(embed_dim, grid_h, grid_w, cls_token=True):
    """Fixed 2-D sine-cosine position embedding, MAE's convention: the first half of the channels
    encodes the column (x), the second half the row (y), each as [sin(pos * omega), cos(pos * omega)]
    with omega_k = 1 / 10000^(k / (D/4)); a zero row for the cls token. -> [1 + grid_h * grid_w, D]."""
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
    """Resize a [1, P + g0*g0, D] position embedding (P prefix tokens: cls) to a new grid, as DINO's
    and CropMAE's evaluation ViTs do (A.1.2): bicubic, with scale_factor (grid + 0.1) / g0 rather
    than an output size, which also fixes where the new grid samples the old one. At the stored
    grid the tensor is returned unchanged."""
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


class PatchEmbed(nn.Module):
    """Image [B, 3, H, W] -> patch tokens [B, (H/P)*(W/P), D] by a stride-P convolution (rho in Eq. 4)."""

    def __init__(self, patch_size=16, in_chans=3, embed_dim=384):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm/MAE key names): [B, L, D] -> [B, L, D]."""

    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class CrossAttention(nn.Module):
    """Multi-head attention from queries x [B, Lq, D] to a memory [B, Lm, D] -> [B, Lq, D]."""

    def __init__(self, dim, num_heads, attn_drop=0.0):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads, self.attn_drop = num_heads, attn_drop
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


def init_linear_and_norm(m):
    """MAE's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def random_masking(x, mask_ratio, noise=None):
    """MAE's masking: keep `int(L * (1 - mask_ratio))` tokens of each sample (19 of 196 at 90%), those
    of lowest `noise` [B, L] (uniform in [0, 1); drawn here if None, passed in for reproducible masks).
    x [B, L, D] -> kept tokens [B, K, D], mask [B, L] (1 = masked), ids_restore [B, L] (the inverse
    permutation)."""
    B, L, D = x.shape
    num_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_kept = torch.gather(x, 1, ids_shuffle[:, :num_keep].unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, L, device=x.device)
    mask[:, :num_keep] = 0
    return x_kept, torch.gather(mask, 1, ids_restore), ids_restore


class VisionTransformer(nn.Module):
    """The encoder e_theta: patch embedding, cls token, fixed sin-cos position embedding, pre-norm
    blocks and a final LayerNorm. Its state-dict keys (cls_token, pos_embed, patch_embed.proj.*,
    blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2, norm.*) are those of
    official MAE, DINO, CropMAE and timm ViTs, so their checkpoints load with strict=True."""

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
        w = self.patch_embed.proj.weight.data  # MAE: the patch conv is initialised like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_linear_and_norm)

    def embed(self, x):
        """Image [B, 3, H, W] -> patch tokens with position [B, L, D], and the cls token [B, 1, D].
        Any size works: the position embedding is interpolated to the patch grid."""
        pos = interpolate_pos_embed(self.pos_embed, x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.patch_embed(x) + pos[:, 1:]  # position added before masking
        return tokens, (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)

    def run_blocks(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_masked(self, x, mask_ratio, noise=None):
        """Eq. (5)/(6): e_theta(m(rho(x), ratio)). x [B, 3, H, W] -> tokens [B, 1 + K, D] (cls first,
        then the K visible patches in kept order), mask [B, L] (1 = masked), ids_restore [B, L]. With
        mask_ratio 0 no token is dropped or shuffled (an unmasked anchor, r_a = 0)."""
        tokens, cls = self.embed(x)
        B, L, _ = tokens.shape
        if mask_ratio > 0:
            tokens, mask, ids_restore = random_masking(tokens, mask_ratio, noise)
        else:
            mask, ids_restore = torch.zeros(B, L, device=x.device), torch.arange(L, device=x.device).expand(B, L)
        return self.run_blocks(torch.cat([cls, tokens], dim=1)), mask, ids_restore

    def forward_features(self, x):
        """Unmasked features of the last block after the final norm: [B, 1 + h*w, D], cls first (the
        features label propagation reads; a CDGMAE inherits this, so it is a feature extractor too)."""
        tokens, cls = self.embed(x)
        return self.run_blocks(torch.cat([cls, tokens], dim=1))

    def forward(self, x):
        return self.forward_features(x)


VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}  # width, depth, heads


def vit_tiny(**kwargs):
    return VisionTransformer(**{"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs})


def vit_small(**kwargs):
    """ViT-S: the paper's encoder (patch_size=8 for ViT-S/8)."""
    return VisionTransformer(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})


def vit_base(**kwargs):
    """ViT-B: MAE's ViT-B/16, the encoder of the metrics of Table 1."""
    return VisionTransformer(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})


class DecoderBlock(nn.Module):
    """The decoder block (Sec. 4): cross-attention, feed-forward, self-attention. This is CropMAE's
    block, on which the paper is built: a post-norm `nn.TransformerDecoderLayer` with its sub-layers
    reordered so that the target tokens first read the anchors, then mix among themselves. FFN
    width 2048, GELU, dropout 0.1 on attention weights, inside the FFN and on every residual branch."""

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
        """CropMAE's: MAE's rule, and the cross-attention's q and kv drawn as the two parts of one
        xavier-uniform [3D, D] weight, as its nn.MultiheadAttention's fused in-projection is (bound
        sqrt(6 / 4D); separate draws would give sqrt(6 / 2D) and sqrt(6 / 3D))."""
        self.apply(init_linear_and_norm)
        dim = self.cross_attn.q.weight.shape[1]
        fused = nn.init.xavier_uniform_(torch.empty(3 * dim, dim))
        self.cross_attn.q.weight.data.copy_(fused[:dim])
        self.cross_attn.kv.weight.data.copy_(fused[dim:])

    def forward(self, x, memory):  # x [B, 1+L, Dd] the target stream, memory [B, M, Dd] the anchors' tokens
        x = self.norm1(x + self.drop(self.cross_attn(x, memory)))
        x = self.norm2(x + self.drop(self.mlp(x)))
        return self.norm3(x + self.drop(self.self_attn(x)))


class CDGMAE(VisionTransformer):
    """Siamese cross-view MAE with N anchors and anchor masking (Sec. 3.3, Eq. 4-10).

    The encoder is this class's ViT part, so a checkpoint's keys are MAE's (cls_token, blocks.*,
    ..., then decoder_embed, mask_token, decoder_pos_embed, decoder_blocks.*, decoder_norm,
    decoder_pred). The defaults are Table 6's single-anchor setting (CDG-MAE-a1): one unmasked
    anchor, a ViT-S/16 encoder, a 4-block decoder of width 256 (Sec. 4), a target mask ratio of
    0.9. The paper's best model, CDG-MAE-a3 (Tables 4, 5), is CDGMAE(num_anchors=3, anchor_mask_ratio=0.25).

    forward(target [B, 3, H, W], anchors [B, N, 3, H, W]) -> loss, pred [B, L, P*P*3], mask [B, L]
    """

    def __init__(self, num_anchors=1, anchor_mask_ratio=0.0, target_mask_ratio=0.9, img_size=224, patch_size=16,
                 embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,
                 decoder_ffn_dim=2048, decoder_dropout=0.1, norm_pix_loss=True):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads)
        if not 0 <= anchor_mask_ratio < 1 or not 0 < target_mask_ratio < 1:
            raise ValueError("mask ratios must lie in [0, 1) (anchors) and (0, 1) (target)")
        self.num_anchors, self.anchor_mask_ratio = num_anchors, anchor_mask_ratio
        self.target_mask_ratio, self.norm_pix_loss = target_mask_ratio, norm_pix_loss
        # One Linear maps the encoder tokens of the target and of every anchor to the decoder width.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([self.decoder_block(decoder_embed_dim, decoder_num_heads, decoder_ffn_dim,
                                                                decoder_dropout) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3)
        self.decoder_pos_embed.data.copy_(sincos_pos_embed(decoder_embed_dim, self.grid_size, self.grid_size)[None])
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder_embed.apply(init_linear_and_norm)
        for block in self.decoder_blocks:
            block.init_weights()
        for m in [self.decoder_norm, self.decoder_pred]:
            m.apply(init_linear_and_norm)

    def decoder_block(self, dim, num_heads, ffn_dim, dropout):
        """The decoder's block: the paper's (CroCoMAE, in section 4, swaps in CroCo's)."""
        return DecoderBlock(dim, num_heads, ffn_dim, dropout)

    def patchify(self, imgs):
        """[B, 3, H, W] -> [B, L, P*P*3], channel last within a patch (MAE's order)."""
        P = self.patch_size
        B, C, H, W = imgs.shape
        x = imgs.reshape(B, C, H // P, P, W // P, P)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // P) * (W // P), P * P * C)

    def unpatchify(self, x, grid_h=None, grid_w=None):
        """[B, L, P*P*3] -> [B, 3, H, W]."""
        P, grid_h, grid_w = self.patch_size, grid_h or self.grid_size, grid_w or self.grid_size
        x = x.reshape(x.shape[0], grid_h, grid_w, P, P, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], 3, grid_h * P, grid_w * P)

    def anchor_memory(self, anchor_latent, anchor_ids_restore):
        """Eq. (7): the tokens of each anchor, cls included, at the decoder width: [B*N, 1+K_a, D] ->
        [B*N, 1+K_a, Dd]; the caller joins a sample's N anchors into one memory A'_v. The memory gets
        no position embedding (CropMAE's; CroCoMAE gives it one)."""
        return self.decoder_embed(anchor_latent)

    def forward_decoder(self, target_latent, ids_restore, memory):
        """Eq. (8)-(9): target_latent [B, 1+K, D] (cls + visible), ids_restore [B, L], memory [B, M, Dd]
        -> the predicted pixels of every target patch [B, L, P*P*3]."""
        x = self.decoder_embed(target_latent)
        B, L = ids_restore.shape
        # Eq. (8): T_a = [T'_v, mask tokens], put back in image order (cls stays first).
        patches = torch.cat([x[:, 1:], self.mask_token.expand(B, L + 1 - x.shape[1], -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        # Eq. (9): T_r = d_psi(T_a, A'_v): each block reads the anchors, then mixes the target's tokens.
        for block in self.decoder_blocks:
            x = block(x, memory)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # the cls row dropped

    def forward_loss(self, target, pred, mask):
        """Eq. (10): the squared error over the masked target patches only, averaged over a patch's
        pixels, then over the masked patches (MAE). With norm_pix_loss each target patch is
        normalised by its own mean and (unbiased) variance, eps 1e-6."""
        patches = self.patchify(target)
        if self.norm_pix_loss:
            mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
            patches = (patches - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - patches.float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, target, anchors, target_noise=None, anchor_noise=None):
        """target [B, 3, H, W], anchors [B, N, 3, H, W]; optional masking noise target_noise [B, L] and
        anchor_noise [B, N, L] (uniform in [0, 1), for reproducible masks). -> loss, pred [B, L, P*P*3],
        mask [B, L] (1 = masked, i.e. predicted)."""
        B, N = anchors.shape[:2]
        if N != self.num_anchors:
            raise ValueError(f"model built for {self.num_anchors} anchors, got {N}")
        # Eq. (4)-(5): the target patchified, masked at r_t, its visible patches encoded.
        target_latent, mask, ids_restore = self.forward_masked(target, self.target_mask_ratio, target_noise)
        # Eq. (6): every anchor masked independently at r_a and encoded by the same (Siamese)
        # encoder: the N anchors of a sample go through it as N rows of one batch.
        anchor_latent, _, anchor_ids_restore = self.forward_masked(
            anchors.flatten(0, 1), self.anchor_mask_ratio, None if anchor_noise is None else anchor_noise.flatten(0, 1))
        # Eq. (7): A'_v = [A'^1_v; ...; A'^N_v], the N anchors' tokens in one memory.
        memory = self.anchor_memory(anchor_latent, anchor_ids_restore).reshape(B, N * anchor_latent.shape[1], -1)
        pred = self.forward_decoder(target_latent, ids_restore, memory)
        return self.forward_loss(target, pred, mask), pred, mask


# =============================================================================
# 2. The sample (Sec. 3.1): one bag of views -> a target and N anchors, one box, one flip
# =============================================================================
#
# A bag is a folder holding the real image and its M generated views (the layout that
# generate_views.py writes, common.bag_files reads):  BAGS/<folder>/<stem>/real.<ext>, view_00.jpg ...

class BagDataset(torch.utils.data.Dataset):
    """The training samples of bags of views (Sec. 3.1 and 4, Tables 2 and 6).

    An item is addressed by key = (epoch, index), and everything random about it -- which image of
    the bag is the target, which N are anchors, the crop box and flip shared by all of them, the
    masking noise -- is drawn from a generator seeded by (seed, epoch, index). So a sample does not
    depend on the worker, rank or world size that loads it: resumed and multi-process runs
    reproduce a single-process one.

    item -> (target [3, S, S] uint8, anchors [N, 3, S, S] uint8, target_noise [L], anchor_noise [N, L]);
    the ImageNet normalisation runs on the device (`normalize`). target_choice: "any" (the paper's
    "random between real and generated": uniform over the 1 + M images), "real" or "generated"
    (Table 2). A bag with an image that cannot be decoded is replaced by the next bags in order
    (the same ones in every run), listed in `bad_bags_file`. With encoded=True (--decode gpu) the
    files stay encoded and the device decodes and crops them (`assemble_on_device`).
    """

    ITEM, MODE = "bag", "bicubic"  # what an item is, in messages; crop_resize's interpolation
    MAX_SUBSTITUTES = 16

    def __init__(self, root, bags, num_views, num_anchors=1, input_size=224, target_choice="any",
                 crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3), num_patches=196, seed=0,
                 encoded=False, bad_bags_file=None):
        if target_choice not in ("any", "real", "generated"):
            raise ValueError(f"target_choice must be any, real or generated, not {target_choice!r}")
        self.root, self.bags = Path(root), list(bags)
        self.num_views, self.num_anchors = num_views, num_anchors
        self.input_size, self.target_choice = input_size, target_choice
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.num_patches, self.seed = num_patches, seed
        self.encoded, self.bad_bags_file, self.reported = encoded, bad_bags_file, set()

    def __len__(self):
        return len(self.bags)

    def __getitem__(self, key):
        epoch, index = key
        for attempt in range(self.MAX_SUBSTITUTES + 1):
            bag = self.bags[(index + attempt) % len(self.bags)]
            rng = np.random.default_rng([self.seed, epoch, index] + ([attempt] if attempt else []))
            try:
                return self.sample(bag, rng)
            except UnreadableImage as e:
                self.report_bad(bag, e)
        raise RuntimeError(f"{self.root / self.bags[index]}: it and the next {self.MAX_SUBSTITUTES} "
                           f"{self.ITEM}s cannot be decoded (list them with --verify-images decode)")

    def sample(self, bag, rng):
        """One bag -> one sample: a target and N anchors among its images, cut with one box and one flip."""
        files = self.files(bag, rng)                                          # [target, anchor_1, ..., anchor_N]
        if self.encoded:
            blobs, sizes = zip(*[read_encoded(path) for path in files])
        else:
            images = [decode_image(path) for path in files]                   # [3, H_i, W_i] uint8 each
            sizes = [(image.shape[-1], image.shape[-2]) for image in images]
        (width, height), regions = self.geometry(files, sizes)
        box = sample_crop_box(rng, width, height, self.crop_scale, self.crop_ratio)  # one box ...
        flip = rng.random() < 0.5                                             # ... and one flip for every image
        target_noise, anchor_noise = self.draw_noise(rng)                     # the masks (Eq. 4 and 6)
        boxes = image_boxes(box, regions)                                     # the box in each image
        if self.encoded:
            return list(blobs), torch.tensor(boxes, dtype=torch.float64), torch.tensor(flip), target_noise, anchor_noise
        crops = crop_views(images, boxes, flip, self.input_size, self.MODE)   # [1 + N, 3, S, S] uint8
        return crops[0], crops[1:], target_noise, anchor_noise

    def files(self, bag, rng):
        """The image files of a sample, [target, anchor_1, ..., anchor_N]: the draws before any decode."""
        real, views = bag_files(self.root / bag)
        paths = [real] + views[:self.num_views]
        return [paths[i] for i in self.choose_views(rng)]

    def choose_views(self, rng):
        """Indices into [real, view_00, ...]: the target first, then N distinct anchors among the rest."""
        if self.target_choice == "real":
            target = 0
        else:  # "generated": one of the views; "any": one of all 1 + M images
            target = int(rng.integers(1 if self.target_choice == "generated" else 0, 1 + self.num_views))
        rest = [i for i in range(1 + self.num_views) if i != target]
        if len(rest) < self.num_anchors:
            raise ValueError("not enough views for the anchors")
        return [target] + [int(a) for a in rng.choice(rest, size=self.num_anchors, replace=False)]

    def geometry(self, files, sizes):
        """Where the shared box is drawn, and what it is relative to in each image: ((width, height)
        of the common geometry, [each image's region, fractions (l, t, r, b)]).

        The views are generated from the real image's centre region (`conditioning_region`), so that
        region is the bag's geometry: the real image's region is the one the generator was
        conditioned on, a square view's the whole view, and the box is drawn on a square of the
        views' size. (A view that is not square, in a bag of k-NN images, is brought to its own
        centre square, the crop its neighbour search embedded.) In a bag of square images of one
        size, every region is (0, 0, 1, 1) and the box is the same fractions of every image."""
        regions = [conditioning_region(width, height) for width, height in sizes]
        side = next(min(size) for path, size in zip(files, sizes) if not is_real_image(path))
        return (side, side), regions

    def draw_noise(self, rng):
        """The masking noise of the target [L] and of the anchors [N, L] (after the crop's draws)."""
        return (torch.from_numpy(rng.random(self.num_patches, dtype=np.float32)),
                torch.from_numpy(rng.random((self.num_anchors, self.num_patches), dtype=np.float32)))

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
    """RandomResizedCrop's box (torchvision's algorithm: whole pixels of a width x height image), as
    fractions (l, t, r, b) of the image. Table 6: area 0.5-1, aspect ratio 0.75-1.33."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left / width, top / height, (left + w) / width, (top + h) / height
    # Fallback: the largest central crop with the aspect ratio clamped into range.
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left / width, top / height, (left + w) / width, (top + h) / height


def conditioning_region(width, height, size=224):
    """The centre region of a width x height image that generate_views.py conditions the generator on
    (`conditioning_tensor`: the shorter side resized to `size` with rounding, a size x size centre
    crop), as fractions (l, t, r, b) of the image; exactly (0, 0, 1, 1) for a square image."""
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return left / new_w, top / new_h, (left + size) / new_w, (top + size) / new_h


def compose_box(outer, inner):
    """The box `inner` (fractions of the crop `outer`) as fractions of the image `outer` is cut from."""
    width, height = outer[2] - outer[0], outer[3] - outer[1]
    return (outer[0] + inner[0] * width, outer[1] + inner[1] * height,
            outer[0] + inner[2] * width, outer[1] + inner[3] * height)


def image_boxes(box, regions):
    """The shared box (fractions of the common geometry) as each image's box: composed with the
    image's region; a region (0, 0, 1, 1) leaves it as it is, bit for bit."""
    return [compose_box(region, box) for region in regions]


def decode_image(path):
    """A file's pixels as uint8 [3, H, W] (a view of H x W x 3 memory): RGB by common.to_rgb's rule
    for every mode; UnreadableImage naming the file if it cannot be decoded or is refused."""
    with open_image(path) as image:
        try:
            return torch.from_numpy(np.array(image if image.mode == "RGB" else to_rgb(image, path))).permute(2, 0, 1)
        except UnreadableImage:
            raise
        except Exception as e:  # noqa: BLE001 -- the decoder's error (a truncated file), with the file's name
            raise UnreadableImage(f"{path}: cannot decode image ({e})") from e


def crop_resize(image, box, size, mode="bicubic", float_math=None):
    """Cut the box (fractions l, t, r, b of the image, rounded to whole pixels as RandomResizedCrop
    cuts) out of image [3, H, W] uint8 and resize it to [3, size, size] uint8, antialiased: bicubic
    (Pillow's filter, a = -0.5) or "bilinear" (--pretext crops and frames). On the CPU torch's uint8
    kernel runs; on a GPU (--decode gpu; or with float_math) the same filter in float32, rounded."""
    height, width = image.shape[-2:]
    left, right = round(box[0] * width), round(box[2] * width)
    top, bottom = round(box[1] * height), round(box[3] * height)
    crop = image[None, :, top:max(bottom, top + 1), left:max(right, left + 1)]
    if not float_math and crop.device.type == "cpu":
        return F.interpolate(crop, size=(size, size), mode=mode, antialias=True, align_corners=False)[0]
    crop = F.interpolate(crop.float(), size=(size, size), mode=mode, antialias=True, align_corners=False)[0]
    return crop.round_().clamp_(0, 255).to(torch.uint8)


def crop_views(images, boxes, flip, size, mode="bicubic"):
    """The images of one sample [3, H_i, W_i] uint8, each cut with its own box (the sample's box in
    that image) and all mirrored left-right or none: -> [V, 3, size, size] uint8."""
    crops = [crop_resize(image, box, size, mode) for image, box in zip(images, boxes)]
    return torch.stack([crop.flip(-1) if flip else crop for crop in crops])


def normalize(x, mean, std):
    """uint8 [..., 3, H, W] -> ImageNet-normalised float32: x / 255, minus the mean, over the std
    ([3, 1, 1] tensors on x's device; the arithmetic of `image_to_tensor`)."""
    return (x.float() / 255.0 - mean) / std


def image_to_tensor(img):
    """PIL RGB -> ImageNet-normalised float tensor [3, H, W] (the encoder's input at evaluation)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


# =============================================================================
# 3. The step and the epoch loop (Sec. 4, Table 6): AdamW, warmup then cosine, as MAE trains
# =============================================================================

def learning_rate(epoch, lr, min_lr, warmup_epochs, epochs):
    """The lr at a fractional epoch: a linear warmup to `lr`, then a half-cycle cosine to `min_lr`,
    set at every iteration (MAE; Table 6's 100 epochs, CropMAE's 5 warmup epochs)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model, weight_decay):
    """AdamW's groups by timm's rule, which MAE and CropMAE train with: no weight decay on biases and
    1-D parameters (LayerNorms) only; the [1, 1, D] cls and mask tokens are decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_one_epoch(model, optimizer, batches, epoch, steps, lr_at, *, first_step=0, global_step=0, accum_iter=1,
                    seed=0, rank=0, max_steps=None, log=None):
    """Steps first_step .. steps - 1 of one epoch (or until global step max_steps), as MAE's
    train_one_epoch. `batches` yields (target, anchors, target_noise, anchor_noise), normalised on the
    training device; `model` is what a step calls (the CDGMAE, or it wrapped in DDP or compiled).
    A step sets the lr of its iteration, lr_at(fractional epoch); runs accum_iter forward and backward
    passes (bf16 autocast on CUDA); takes one optimizer step; and calls log(global step, epoch, step,
    lr, loss) with the step's mean loss (a device tensor). Returns (global step, the last step done,
    whether max_steps stopped the epoch, the last batch and prediction)."""
    model.train()
    step, last = first_step - 1, None
    for step in range(first_step, steps):
        lr = lr_at(epoch + step / steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Dropout (and any other randomness in the model) is a function of (seed, step, rank): a
        # resumed run replays exactly what an uninterrupted one would have drawn.
        torch.manual_seed(seed * 1_000_003 + global_step * 1009 + rank)
        step_loss = 0.0
        for micro in range(accum_iter):
            target, anchors, target_noise, anchor_noise = next(batches)
            # With DDP, the gradients are averaged over the ranks at the step's last pass only.
            sync = micro == accum_iter - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), \
                    torch.autocast(target.device.type, dtype=torch.bfloat16, enabled=target.device.type == "cuda"):
                loss, pred, mask = model(target, anchors, target_noise, anchor_noise)
            (loss / accum_iter).backward()
            step_loss = step_loss + loss.detach() / accum_iter
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        last = (target, anchors, pred.detach(), mask)
        if log is not None:
            log(global_step, epoch, step, lr, step_loss)
        if max_steps is not None and global_step >= max_steps:
            return global_step, step, True, last
    return global_step, step, False, last


def pretrain(model, optimizer, loader, sampler, epochs, steps_per_epoch, lr_at, to_device, start=(0, 0, 0),
             after_epoch=None, **step_settings):
    """The epoch loop (Table 6: 100 epochs): each epoch a new order of the bags (the sampler's), its
    steps (`train_one_epoch`, with `step_settings`), then after_epoch(epoch, last step, global step,
    last batch) writes the checkpoints. start: (epoch, step, global step) to resume from.
    to_device: a loader batch -> the step's normalised tensors on the training device."""
    start_epoch, start_step, global_step = start
    for epoch in range(start_epoch, epochs):
        first = start_step if epoch == start_epoch else 0
        sampler.set_epoch(epoch, first)  # the loader's workers stay; only the keys they are given change
        batches = (to_device(batch) for batch in loader)
        global_step, step, stopped, last = train_one_epoch(model, optimizer, batches, epoch, steps_per_epoch, lr_at,
                                                           first_step=first, global_step=global_step, **step_settings)
        if after_epoch is not None:
            after_epoch(epoch, step, global_step, last)
        if stopped:
            break
    return global_step


# =============================================================================
# 4. What the paper compares with and measures: CroCo's decoder, the FLOPs of Table 8,
#    and the family's other pretext data (Table 5): CropMAE's crops, SiamMAE's frames
# =============================================================================

class CroCoDecoderBlock(nn.Module):
    """CroCo's decoder block, "CrossBlock" (CroCo Sec. 3, Fig. 4), pre-norm:

        x = x + SelfAttn(LN1(x));  x = x + CrossAttn(LN2(x), LN_m(memory));  x = x + MLP(LN3(x))

    The memory (the other views' tokens) is normalised by the block's own LayerNorm and left
    unchanged, so every block reads the same tokens. As in CroCo's decoder: MLP ratio 4 (GELU),
    qkv biases, LayerNorm eps 1e-6, no dropout; the final norm is the model's decoder_norm."""

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
        """CroCo's: MAE's rule; CroCo projects keys and values with two [D, D] Linears, so each half of
        the fused kv weight gets its own draw (bound sqrt(6 / 2D), not the fused [2D, D]'s sqrt(6 / 3D))."""
        self.apply(init_linear_and_norm)
        for half in self.cross_attn.kv.weight.data.chunk(2):
            nn.init.xavier_uniform_(half)

    def forward(self, x, memory):  # x [B, 1+L, Dd] the target stream, memory [B, M, Dd] the anchors' tokens
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), self.norm_memory(memory))
        return x + self.mlp(self.norm3(x))


class CroCoMAE(CDGMAE):
    """CDGMAE with CroCo's decoder (`--decoder-block croco`): CroCo's pre-norm block (MLP ratio 4, no
    dropout: decoder_ffn_dim and decoder_dropout do not apply), and, as in CroCo, the decoder's sin-cos
    position embedding on the memory too: each anchor's tokens get the embedding of their own patch
    positions (zero in the cls slot). Everything else is the paper's model."""

    def decoder_block(self, dim, num_heads, ffn_dim, dropout):
        return CroCoDecoderBlock(dim, num_heads)

    def anchor_memory(self, anchor_latent, anchor_ids_restore):
        """[B*N, 1+K_a, D] -> [B*N, 1+K_a, Dd]: the anchors' tokens at the decoder width, plus the
        decoder position embedding of the patches each anchor kept (forward_masked kept the first
        K_a of the permutation whose inverse is anchor_ids_restore)."""
        memory = self.decoder_embed(anchor_latent)
        ids_keep = torch.argsort(anchor_ids_restore, dim=1)[:, :memory.shape[1] - 1]
        pos = self.decoder_pos_embed.expand(ids_keep.shape[0], -1, -1)
        kept = torch.gather(pos[:, 1:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, pos.shape[2]))
        return memory + torch.cat([pos[:, :1], kept], dim=1)


DECODER_BLOCKS = {"cdgmae": CDGMAE, "croco": CroCoMAE}  # --decoder-block -> the model's class


def build_model(decoder_block="cdgmae", **config):
    """The model of a run's configuration (`model_config`): CDGMAE, or CroCoMAE for CroCo's decoder."""
    if decoder_block not in DECODER_BLOCKS:
        raise ValueError(f"decoder_block {decoder_block!r}: must be one of {', '.join(DECODER_BLOCKS)}")
    return DECODER_BLOCKS[decoder_block](**config)


def count_flops(model, num_anchors=None, batch_size=1):
    """The FLOPs of one forward pass up to the loss (A.3.1, Table 8), fvcore's convention: every
    nn.Linear and nn.Conv2d counts one FLOP per multiply-add and every affine LayerNorm 5 FLOPs per
    element; the products inside F.scaled_dot_product_attention, which fvcore does not count, are
    returned apart as `attention` (the multiply-adds of q.k and attn.v of this file's Attention and
    CrossAttention). -> per-sample {linear, conv, layernorm, attention, fvcore (= the first three)}."""
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

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if (hook := {nn.Linear: linear_hook, nn.Conv2d: conv_hook, nn.LayerNorm: norm_hook,
                          Attention: self_attn_hook, CrossAttention: cross_attn_hook}.get(type(m)))]
    size, device, was_training = model.img_size, next(model.parameters()).device, model.training
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


# The same model and steps on other data: --pretext crops reads a plain image folder (any depth,
# ImageNet's layout), --pretext frames a folder of videos stored as frame folders (ROOT/<video>/
# <frame>.jpg at any depth). An item is one image or one video; an epoch is one sample per item.
# Both keep BagDataset's properties: every draw comes from the generator of (seed, epoch, index),
# uint8 output, the substitution of unreadable items.

PRETEXTS = ("bags", "crops", "frames")
PRETEXT_ITEMS = {"bags": "bag", "crops": "image", "frames": "video"}
# The flags left unset take their pretext's value: bags the paper's (Table 6), crops CropMAE's
# ImageNet script (GlobalToLocal: global area [0.10, 1], mask 98.5%), frames SiamMAE's (CropMAE's
# SiamMAE script: area [0.5, 1], mask 95%).
PRETEXT_DEFAULTS = {"bags": dict(target_mask=0.9, crop_scale=(0.5, 1.0), crop_ratio=(0.75, 1.33)),
                    "crops": dict(target_mask=0.985, crop_scale=(0.10, 1.0), crop_ratio=(3 / 4, 4 / 3)),
                    "frames": dict(target_mask=0.95, crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3))}
FRAME_GAP = (4, 48)  # SiamMAE: the target is 4 to 48 frames after its unmasked frame


def pretext_default(args, name):
    """args.<name>, or the pretext's default where the flag was not given."""
    value = getattr(args, name)
    return PRETEXT_DEFAULTS[getattr(args, "pretext", "bags")][name] if value is None else value


class CropDataset(BagDataset):
    """--pretext crops: CropMAE's GlobalToLocal (the paper's Table 5 baseline) on a plain image folder.
    The N anchors are global random resized crops of the image (area `crop_scale`), the target a
    random resized crop of the first one (area `local_scale` of it): `sample_crop_params`,
    `cut_crops`. Items, noise, determinism and substitution as in BagDataset; encoded=True gives
    ([bytes], boxes [N + 1, 4], flips [N + 1], noises)."""

    ITEM, MODE = "image", "bilinear"

    def __init__(self, root, images, num_anchors=1, input_size=224, crop_scale=(0.10, 1.0), local_scale=(0.3, 0.6),
                 crop_ratio=(3 / 4, 4 / 3), num_patches=196, seed=0, encoded=False, bad_bags_file=None):
        super().__init__(root, images, 0, num_anchors, input_size, "any", crop_scale, crop_ratio, num_patches,
                         seed, encoded, bad_bags_file)
        self.local_scale = local_scale

    def sample(self, image, rng):
        path = self.root / image
        if self.encoded:
            blob, (width, height) = read_encoded(path)
        else:
            pixels = decode_image(path)
            height, width = pixels.shape[-2:]
        global_boxes, local_box, flips = sample_crop_params(rng, width, height, self.num_anchors, self.input_size,
                                                            self.crop_scale, self.local_scale, self.crop_ratio)
        target_noise, anchor_noise = self.draw_noise(rng)
        if self.encoded:
            boxes = torch.tensor(global_boxes + [local_box], dtype=torch.float64)
            return [blob], boxes, torch.tensor(flips), target_noise, anchor_noise
        return (*cut_crops(pixels, global_boxes, local_box, flips, self.input_size), target_noise, anchor_noise)


def sample_crop_params(rng, width, height, num_anchors, size, global_scale=(0.10, 1.0), local_scale=(0.3, 0.6),
                       ratio=(3 / 4, 4 / 3)):
    """CropMAE's GlobalToLocal draws for one image of width x height: N global boxes (fractions of the
    image; area `global_scale`), one local box (fractions of the first global crop once resized to
    size x size, in whole pixels of it; area `local_scale` of it), and N + 1 flips drawn one per view
    (target first), as CropMAE flips each view on its own. -> ([N boxes], local box, [N + 1 bools])."""
    global_boxes = [sample_crop_box(rng, width, height, global_scale, ratio) for _ in range(num_anchors)]
    local_box = sample_crop_box(rng, size, size, local_scale, ratio)
    return global_boxes, local_box, [bool(rng.random() < 0.5) for _ in range(num_anchors + 1)]


def cut_crops(image, global_boxes, local_box, flips, size):
    """CropMAE's views of one image [3, H, W] uint8: the anchors are the global crops, the target a
    crop of the first global crop after its resize (as CropMAE crops the resized global view), all
    antialiased bilinear, each flipped by its own draw. -> (target [3, S, S], anchors [N, 3, S, S])."""
    anchors = [crop_resize(image, box, size, mode="bilinear") for box in global_boxes]
    views = [crop_resize(anchors[0], local_box, size, mode="bilinear")] + anchors
    views = [view.flip(-1) if flip else view for view, flip in zip(views, flips)]
    return views[0], torch.stack(views[1:])


class FrameDataset(BagDataset):
    """--pretext frames: SiamMAE's frame pairs from videos stored as frame folders. The target is a
    frame 4 to 48 frames after its unmasked anchor (`sample_frame_indices`); one random resized crop
    box (area `crop_scale`) and one flip are shared by all frames of the sample, antialiased
    bilinear, as SiamMAE's data pipe does. Items, noise, determinism, substitution (a video with an
    unreadable frame, or fewer than gap[0] + 1 frames left since the start-up check) and the encoded
    form as in BagDataset."""

    ITEM, MODE = "video", "bilinear"

    def __init__(self, root, videos, num_anchors=1, input_size=224, crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3),
                 num_patches=196, seed=0, encoded=False, bad_bags_file=None, gap=FRAME_GAP):
        super().__init__(root, videos, 0, num_anchors, input_size, "any", crop_scale, crop_ratio, num_patches,
                         seed, encoded, bad_bags_file)
        self.gap = gap

    def geometry(self, files, sizes):
        """The frames of a video share one geometry: the box is drawn on the target frame's size and
        cuts the same fractions of every frame (SiamMAE's shared crop)."""
        return sizes[0], [(0.0, 0.0, 1.0, 1.0)] * len(sizes)

    def files(self, video, rng):
        frames = list_files(self.root / video)
        if len(frames) < self.gap[0] + 1:
            raise UnreadableImage(f"{self.root / video}: {len(frames)} frames, needs at least {self.gap[0] + 1}")
        return [frames[i] for i in sample_frame_indices(rng, len(frames), self.num_anchors, self.gap)]


def sample_frame_indices(rng, num_frames, num_anchors=1, gap=FRAME_GAP):
    """[target, anchor_1, ..., anchor_N] frame indices of a video of num_frames frames. The first pair
    is SiamMAE's: a gap g uniform in [gap[0], min(gap[1], n - 1)] (both ends included), the unmasked
    frame a uniform in [0, n - 1 - g], the target the later frame a + g. Anchors 2..N are other
    frames before the target, each at its own gap within the same range (distinct frames when the
    window before the target holds enough, else drawn with repeats)."""
    if num_frames < gap[0] + 1:
        raise ValueError(f"{num_frames} frames, needs at least {gap[0] + 1} (a gap of {gap[0]})")
    g = int(rng.integers(gap[0], min(gap[1], num_frames - 1) + 1))
    first = int(rng.integers(0, num_frames - g))
    target, others = first + g, []
    if num_anchors > 1:
        window = [i for i in range(max(0, target - gap[1]), target - gap[0] + 1) if i != first] or [first]
        others = rng.choice(window, size=num_anchors - 1, replace=len(window) < num_anchors - 1).tolist()
    return [target, first] + [int(i) for i in others]


# =============================================================================
# 5. The run: data loading, --decode gpu, checkpoints and encoders, the run folder and its
#    resume checks, the start-up scan, torchrun/DDP, the command line
# =============================================================================

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


def make_dataset(args, items, num_patches, output):
    """The dataset of --pretext: BagDataset, CropDataset or FrameDataset."""
    shared = dict(num_patches=num_patches, seed=args.seed, encoded=args.decode == "gpu",
                  bad_bags_file=output / ("bad_bags.txt" if args.pretext == "bags" else f"bad_{args.pretext}.txt"))
    scale, ratio = tuple(args.crop_scale), tuple(args.crop_ratio)
    if args.pretext == "crops":
        return CropDataset(args.data, items, args.anchors, args.input_size, scale, tuple(args.local_scale), ratio,
                           **shared)
    if args.pretext == "frames":
        return FrameDataset(args.data, items, args.anchors, args.input_size, scale, ratio, **shared)
    return BagDataset(args.data, items, args.views, args.anchors, args.input_size, args.target_view, scale, ratio,
                      **shared)


def make_loader(args, dataset, sampler, per_step, device):
    """One DataLoader for the whole run: persistent workers (the sampler is moved on with set_epoch),
    uint8 batches (encoded ones with --decode gpu), and a prefetch depth of about 256 samples per
    worker (2 batches of 128 or more, up to 8 small ones), so large batches do not pile up in
    shared memory."""
    extra = {}
    if args.workers > 0:
        extra = dict(persistent_workers=True, prefetch_factor=min(8, max(2, -(-256 // per_step))))
    return torch.utils.data.DataLoader(dataset, batch_size=per_step, sampler=sampler, num_workers=args.workers,
                                       pin_memory=device.type == "cuda" and args.decode == "cpu", drop_last=False,
                                       collate_fn=collate_encoded if args.decode == "gpu" else None, **extra)


def batch_to_device(args, device):
    """loader batch -> (target, anchors) normalised on the device, and the masking noise: what a step reads."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)

    def to_device(batch):
        if args.decode == "gpu" and args.pretext == "crops":
            target, anchors, target_noise, anchor_noise = assemble_crops_on_device(batch, args.input_size, device)
        elif args.decode == "gpu":
            target, anchors, target_noise, anchor_noise = assemble_on_device(
                batch, args.input_size, device, mode="bicubic" if args.pretext == "bags" else "bilinear")
        else:
            target, anchors, target_noise, anchor_noise = [t.to(device, non_blocking=True) for t in batch]
        return normalize(target, mean, std), normalize(anchors, mean, std), target_noise, anchor_noise
    return to_device


# --decode gpu: the workers read the files' bytes and draw the boxes; the GPU decodes (nvJPEG) and
# crops. (common.gpu_decode_problem: which images torchvision decodes as the CPU path does.)

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



def collate_encoded(samples):
    """Collate --decode gpu samples: the bytes of all B x V files in one uint8 tensor with their
    lengths [B, V], then the stacked boxes, flips and noise. (A worker hands each tensor of a batch
    to the main process as its own shared-memory segment and file descriptor: one tensor per file,
    1,024 for a batch of 256 a3 samples, cost milliseconds each and exceeded the usual limit of
    1,024 open files, which stalled the loader.)"""
    blobs, boxes, flips, target_noise, anchor_noise = zip(*samples)
    lengths = torch.tensor([[len(b) for b in sample] for sample in blobs], dtype=torch.int64)
    return (torch.cat([b for sample in blobs for b in sample]), lengths, torch.stack(boxes), torch.stack(flips),
            torch.stack(target_noise), torch.stack(anchor_noise))


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
    """--decode gpu: a batch of encoded samples (`collate_encoded`; boxes [B, N + 1, 4], each image's
    box, mapped by the workers from the sizes in the files' headers) -> the uint8 batch of the CPU
    path: target [B, 3, S, S], anchors [B, N, 3, S, S], noise. `decode` maps a list of byte tensors
    to [3, H, W] uint8 images (injectable: tests decode on the CPU)."""
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


# Checkpoints of the MAE family: an encoder from MAE, DINO, CropMAE or CDG-MAE weights

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


# The run's checkpoints and pictures

def write_checkpoint(path, model, optimizer, settings, next_epoch, next_step, global_step, what="the checkpoint"):
    """A training checkpoint (weights_only-readable: state dicts, ints, the settings as plain values),
    written atomically; a full disk is a one-line exit and the previous file stays whole."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "next_epoch": next_epoch,
            "next_step": next_step, "global_step": global_step, "args": settings}

    def write(tmp):
        with open(tmp, "wb") as f:  # a Python file, so that a full disk is an OSError
            torch.save(ckpt, f)
    write_or_exit(path, write, what, then="rerun with --resume auto")


def save_checkpoints(args, run, epoch, step, global_step, last):
    """After every epoch or stop: checkpoint-last.pth, a kept copy every --save-every epochs and a
    reconstruction picture every --vis-every epochs (rank 0; each written atomically)."""
    finished = step == run.steps_per_epoch - 1
    next_epoch, next_step = (epoch + 1, 0) if finished else (epoch, step + 1)
    state = (run.model, run.optimizer, run.settings, next_epoch, next_step, global_step)
    write_checkpoint(run.output / "checkpoint-last.pth", *state)
    if finished and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs):
        write_checkpoint(run.output / f"checkpoint-{epoch + 1:04d}.pth", *state)
    if finished and last and args.vis_every and ((epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs):
        picture = reconstruction_image(run.model, *last)
        write_or_exit(run.output / f"reconstruction-{epoch + 1:04d}.png", lambda tmp: picture.save(tmp, format="PNG"),
                      "the reconstruction picture", then="rerun with --resume auto")


def start_records(args, run, num_items, per_step, resumed, start):
    """Rank 0, before the first step: print the run's sizes (and where it resumed), write
    OUTPUT/args.json, cut log.jsonl to the steps done (`truncate_log`) and open it for appending, and
    on a fresh start write the initial weights, checkpoint-0000.pth (the run's own random-init
    baseline, read from a file rather than re-derived from the seed; a run can resume from it).
    resumed: the checkpoint resumed from, or None; start: (epoch, step, global step)."""
    (start_epoch, start_step, global_step), output = start, run.output
    counts = count_flops(build_model(**{**model_config(args), "decoder_dropout": 0.0}))
    data = {"bags": f"{num_items} bags of 1 real + {args.views} views",
            "crops": f"{num_items} images (CropMAE crops)", "frames": f"{num_items} videos (SiamMAE frames)"}
    print(f"{data[args.pretext]}; {run.world_size} rank(s) x {per_step} samples x "
          f"{args.accum_iter} accumulation = global batch {args.batch_size}; {run.steps_per_epoch} steps/epoch; "
          f"lr {args.lr:.3g}; {counts['fvcore'] / 1e9:.3g} GFLOPs/sample (fvcore)")
    if resumed:
        print(f"resumed from {resumed}: epoch {start_epoch}, step {start_step} of {run.steps_per_epoch}")
    write_or_exit(output / "args.json", lambda tmp: Path(tmp).write_text(json.dumps(run.settings, indent=2)),
                  "the settings", then="rerun with --resume auto")
    truncate_log(output / "log.jsonl", global_step, then="rerun with --resume auto")
    run.log_file = open(output / "log.jsonl", "a")
    if global_step == 0:
        write_checkpoint(output / "checkpoint-0000.pth", run.model, run.optimizer, run.settings, 0, 0, 0,
                         "the initial checkpoint")


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


# The run folder: one run per --output, resumed only with the settings it was made with

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


def refuse_changed_settings(args, ckpt, resume, output):
    """Exit, naming every difference (common.refuse_other_settings), if resuming would change what
    the run computes. Without a checkpoint, --resume auto compares with OUTPUT/args.json (a run killed
    before its first checkpoint restarts from scratch, but only with its own settings). Keys a run did
    not record (older versions) and keys not known yet (views and bags before the scan) are skipped;
    --epochs, the cosine's length, may grow once the run has finished its epochs."""
    if ckpt is not None:
        stored, source = ckpt["args"], resume
        finished = ckpt["next_epoch"] >= stored.get("epochs", math.inf)
    elif args.resume == "auto" and (output / "args.json").exists():
        source, finished = output / "args.json", False
        try:
            stored = read_record(source, "remove it to start the run afresh")
        except InputError as e:
            raise SystemExit(str(e)) from None
    else:
        return
    current, names = run_settings(args), {}
    for key in RESULT_SETTINGS + tuple(model_config(args)) + (() if finished else ("epochs",)):
        flag = FLAG_NAMES.get(key, "--" + key.replace("_", "-"))
        if key in stored and current.get(key) is not None and flag not in names.values() \
                and not (key == "local_scale" and current["pretext"] != "crops"):
            names[key] = flag
    stored = {**stored, "data": os.path.realpath(stored["data"])} if "data" in stored else stored
    way_out = "resume with the run's settings, or start a new run in another --output"
    if stored.get("epochs", args.epochs) != args.epochs and not finished:
        way_out = "the cosine's length sets the lr of every remaining step: extend a run once it has finished; " + way_out
    try:
        refuse_other_settings(source, stored, current, keys=list(names), names=names, made="the run was made",
                              what_to_do=way_out)
    except InputError as e:
        raise SystemExit(one_line(e)) from None


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
    """Exit with one line, before any work, if the checkpoint's weights do not fit the model that this
    command line builds (a hand-made checkpoint whose recorded settings match but whose tensors do
    not: another width, depth or decoder). The model is built on the meta device: shapes only."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(**model_config(args)).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in ckpt["model"].items() if torch.is_tensor(v)}
    differ = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
    if differ:
        k = differ[0]
        raise SystemExit(f"{path}: its weights do not fit this run's model ({len(differ)} tensor(s) differ, e.g. {k}: "
                         f"checkpoint {found.get(k, 'absent')}, model {expected.get(k, 'absent')}) "
                         "(--resume needs a checkpoint of this run, with its settings)")


# The start-up scan: list and check the data, split over ranks and processes, cached

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
    bags = sorted(gather(find_bags(args.data, rank, world_size, processes, args.pretext), world_size))
    if not bags:
        raise SystemExit(f"{args.data}: no {item}s found ({EXPECTED_LAYOUT[args.pretext]})")
    refuse_line_breaks(args.data, bags, item)
    num_views, setting = None, ""
    if args.pretext == "bags":
        num_views = args.views or max(len(bag_files(Path(args.data) / b)[1]) for b in bags[:1000])
        setting = f" (M = {num_views} views, N = {args.anchors} anchors)"
        problems = check_bags(args.data, bags[rank::world_size], num_views, 1 + args.anchors, args.verify_images,
                              processes, gpu_check if args.decode == "gpu" else None)
    else:
        problems = check_items(args.data, bags[rank::world_size], args.pretext, args.verify_images, processes,
                               gpu_check if args.decode == "gpu" else None, min_frames=FRAME_GAP[0] + 1)
    problems = dict(gather(problems.items(), world_size))
    if args.pretext == "bags" and args.target_view == "real" and num_views < args.anchors:
        problems["(all)"] = f"--target-view real needs at least {args.anchors} generated views, bags have {num_views}"
    if problems:
        listed = sorted(problems.items())
        if rank == 0:  # one "item<TAB>reason" a line
            text = "".join(f"{b}\t{' '.join(why.split())}\n" for b, why in listed)
            output.mkdir(parents=True, exist_ok=True)
            write_or_exit(output / f"{item}-problems.txt", lambda tmp: Path(tmp).write_text(text), "a list", then="rerun with --resume auto")
        shown = "; ".join(f"{bag}: {why}" for bag, why in listed[:3])
        raise SystemExit(f"{args.data}: {len(problems)} of {len(bags)} {item}s cannot be used{setting}: "
                         f"{shown}{' ...' if len(listed) > 3 else ''} "
                         f"(fix or remove them; all are listed in {output / f'{item}-problems.txt'})")
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        index = {"key": key, "verified": args.verify_images, "num_views": num_views, "bags": bags}
        write_or_exit(cache, lambda tmp: Path(tmp).write_text(json.dumps(index)), "the bag index", then="rerun with --resume auto")
    return bags, num_views


# torchrun and DDP: NCCL on CUDA, gloo on CPU

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


# The run

class TrainingLog:
    """train_one_epoch's `log` on every rank: the loss summed on the device (no sync per step) and,
    every --log-every steps and at an epoch's end, averaged over the steps and the ranks (one
    collective), shown on rank 0's progress bar and appended to OUTPUT/log.jsonl with the lr and
    samples/s."""

    def __init__(self, run, batch_size, log_every):
        self.run, self.batch_size, self.log_every = run, batch_size, log_every
        self.bar, self.epoch, self.loss_sum, self.steps, self.t_last = None, None, 0.0, 0, time.time()

    def __call__(self, global_step, epoch, step, lr, loss):
        run = self.run
        if epoch != self.epoch:  # a new epoch: a new progress bar (shown on rank 0)
            self.close()
            self.epoch = epoch
            self.bar = tqdm(total=run.steps_per_epoch, initial=step, desc=f"epoch {epoch}", disable=run.rank != 0,
                            dynamic_ncols=True)
        self.bar.update(1)
        self.loss_sum, self.steps = self.loss_sum + loss, self.steps + 1
        if global_step % self.log_every and step != run.steps_per_epoch - 1:
            return
        if run.device.type == "cuda":  # samples/s of steps the GPU has finished, not merely queued
            torch.cuda.synchronize(run.device)
        now = time.time()
        samples_per_s = self.steps * self.batch_size / max(now - self.t_last, 1e-9)
        loss_sum = torch.as_tensor(self.loss_sum, dtype=torch.float32, device=run.device).clone()
        if run.world_size > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= run.world_size
        record = {"epoch": epoch, "step": global_step, "lr": lr, "loss": loss_sum.item() / self.steps,
                  "samples_per_s": samples_per_s}
        self.loss_sum, self.steps, self.t_last = 0.0, 0, now
        if run.rank == 0:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", samples_per_s=f"{samples_per_s:.1f}")
            try:
                run.log_file.write(json.dumps(record) + "\n")
                run.log_file.flush()
            except OSError as e:
                raise SystemExit(f"{run.output / 'log.jsonl'}: cannot write the log ({e.strerror or e}) "
                                 f"(free space in {run.output}, then rerun with --resume auto)") from None

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train(args, bags, rank, world_size, device, per_step, output, ckpt, resume):
    """The model, the optimizer, the loader and the run's records, then the epoch loop (`pretrain`,
    Table 6); returns the model."""
    steps_per_epoch, item = len(bags) // args.batch_size, PRETEXT_ITEMS[args.pretext]
    if steps_per_epoch == 0:
        raise SystemExit(f"{args.data}: {len(bags)} {item}s is fewer than one global batch of {args.batch_size} "
                         f"(lower --batch-size or add {item}s)")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(**model_config(args)).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=tuple(args.betas),
                                  fused=device.type == "cuda" or None)  # one kernel for all parameters
    start = resume_from(ckpt, resume, model, optimizer) if ckpt else (0, 0, 0)  # (epoch, step, global step)
    if args.max_steps is not None and start[2] >= args.max_steps or start[0] >= args.epochs:
        print(f"{output}: nothing to do (step {start[2]}, epoch {start[0]} of {args.epochs})")
        return model
    train_model = model_for_training(model, world_size, device, args.compile)  # DDP, torch.compile
    sampler = GlobalBatchSampler(len(bags), args.batch_size, rank, world_size, seed=args.seed)
    loader = make_loader(args, make_dataset(args, bags, model.num_patches, output), sampler, per_step, device)
    run = argparse.Namespace(model=model, optimizer=optimizer, rank=rank, world_size=world_size, device=device,
                             output=output, steps_per_epoch=steps_per_epoch, settings=run_settings(args), log_file=None)
    if rank == 0:  # a summary line, args.json, the log, and checkpoint-0000.pth on a fresh start
        start_records(args, run, len(bags), per_step, resume if ckpt else None, start)
    log = TrainingLog(run, args.batch_size, args.log_every)

    def lr_at(epoch):
        return learning_rate(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)

    def after_epoch(epoch, step, global_step, last):
        if rank == 0:
            save_checkpoints(args, run, epoch, step, global_step, last)
    try:
        pretrain(train_model, optimizer, loader, sampler, args.epochs, steps_per_epoch, lr_at,
                 batch_to_device(args, device), start, after_epoch, accum_iter=args.accum_iter, seed=args.seed,
                 rank=rank, max_steps=args.max_steps, log=log)
    finally:
        log.close()
        if run.log_file:
            run.log_file.close()
        if world_size > 1:
            dist.destroy_process_group()
    return model


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.count_flops:
        counts = count_flops(build_model(**{**model_config(args), "img_size": 224}))
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
    args.bags = list_fingerprint(bags, PRETEXT_ITEMS[args.pretext])
    refuse_changed_settings(args, ckpt, resume, output)  # now with the views and the bag list known
    return train(args, bags, rank, world_size, device, per_step, output, ckpt, resume)


# The command line

DEFAULT_DATA = "data/bags"  # --data default, relative to the working folder (the docstring's torchrun usage names none)
SEED_MAX = 2 ** 32 - 1  # torch's seed of a step, seed * 1_000_003 + ..., must stay below 2^64


def get_args_parser():
    """The command line; each argument group is added by its own function, in --help's order."""
    p = argparse.ArgumentParser(
        description="CDG-MAE pre-training on bags of views (defaults: the paper's single-anchor "
                    "setting, Table 6), or on the family's other pretext data (--pretext crops: CropMAE, "
                    "frames: SiamMAE). Run with python (one process) or torchrun (DDP).",
        formatter_class=HelpFormatter)
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
