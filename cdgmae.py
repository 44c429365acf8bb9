"""CDG-MAE: cross-view masked autoencoder pre-training on bags of diffusion-generated views.

Reference implementation of "CDG-MAE: Learning Correspondences from Diffusion Generated
Views" (Belagali et al.). This one file holds

  1. the model: a ViT encoder with the MAE/DINO/timm state-dict layout, the CDG-MAE
     decoder (cross-attention to N anchors, Sec. 3.3 and 4) and the loss (Eq. 4-10);
  2. the FLOP counter that reproduces the paper's Table 8 (Sec. A.3.1);
  3. checkpoint loading for MAE, DINO, CropMAE and CDG-MAE checkpoints;
  4. the bag-of-views dataset (Sec. 3.1) and the torchrun/DDP training script (Table 6).

Usage:
    python cdgmae.py --data BAGS --output runs/a1                       # one process
    torchrun --nproc_per_node 8 cdgmae.py --data BAGS --anchors 3 --anchor-mask 0.25
    python cdgmae.py --count-flops --anchors 3 --anchor-mask 0.25      # Table 8 GFLOPs

Import:
    from cdgmae import CDGMAE, vit_small, vit_base
    loss, pred, mask = CDGMAE(num_anchors=3, anchor_mask_ratio=0.25)(target, anchors)
"""
import argparse
import contextlib
import json
import math
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

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
# CDG-MAE
# -----------------------------------------------------------------------------

class CDGMAE(VisionTransformer):
    """Siamese cross-view MAE with N anchors and anchor masking (Sec. 3.3, Eq. 4-10).

    The encoder is this class's ViT part (so a checkpoint's keys are MAE's: cls_token,
    blocks.*, ..., then decoder_embed, mask_token, decoder_pos_embed, decoder_blocks.*,
    decoder_norm, decoder_pred). The paper's default, CDGMAE(num_anchors=3,
    anchor_mask_ratio=0.25), is a ViT-S/16 encoder, a 4-block decoder of width 256 and a
    target mask ratio of 0.9.

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
        for m in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            m.apply(_init_linear_and_norm)
        if decoder_block == "croco":
            for block in self.decoder_blocks:
                block.init_weights()

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
        # Eq. (9): T_r = d_psi(T_a, A'_v). Each block of the paper's decoder (Sec. 4) runs
        # cross-attention to the anchors A'_v, then the feed-forward, then self-attention over T_a.
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
# Checkpoints of the MAE family
# -----------------------------------------------------------------------------

DECODER_PREFIXES = ("decoder_", "mask_token")  # MAE, CropMAE and CDG-MAE decoder parameters
HEAD_PREFIXES = ("head.", "fc_norm.")          # classification / DINO projection heads


def load_checkpoint(path):
    """torch.load with weights_only=True (no arbitrary code), allowing the argparse.Namespace
    that MAE's and CropMAE's training checkpoints store under "args"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- re-raised with the file's name
        raise RuntimeError(f"{path}: cannot read checkpoint ({e})") from e


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


def load_encoder_state(encoder, state, name="checkpoint"):
    """Load an encoder state dict strictly into a VisionTransformer.

    Decoder keys (decoder_*, mask_token) and heads (head.*, fc_norm.*) are dropped; the
    position embedding is interpolated if the checkpoint's grid differs from the
    encoder's. Any other missing or unexpected key is an error that lists the keys.
    Returns the dropped keys.
    """
    dropped = sorted(k for k in state if k.startswith(DECODER_PREFIXES + HEAD_PREFIXES))
    state = {k: v for k, v in state.items() if k not in dropped}
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


def encoder_from_checkpoint(checkpoint, img_size=None, num_heads=None):
    """Build a VisionTransformer shaped like a checkpoint's encoder and load it strictly.

    checkpoint: a path or an already loaded dict. Width, depth and patch size are read off
    the tensors; img_size defaults to the stored position-embedding grid x patch size (so
    the embedding is resized once, to each input's grid, and never twice); heads come from
    `num_heads`, else the checkpoint's args["num_heads"], else the ViT convention of 64
    channels per head (ViT-T/S/B: 3/6/12).
    """
    name = "checkpoint" if isinstance(checkpoint, dict) else str(checkpoint)
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    state = unwrap_state_dict(ckpt, name)
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError(f"{name}: no patch_embed.proj.weight / pos_embed, not a ViT checkpoint")
    embed_dim, _, patch_size, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    num_heads = num_heads or args.get("num_heads") or max(1, embed_dim // 64)
    img_size = img_size or math.isqrt(state["pos_embed"].shape[1] - 1) * patch_size
    encoder = VisionTransformer(img_size, patch_size, embed_dim, depth, num_heads)
    load_encoder_state(encoder, state, name)
    return encoder


# -----------------------------------------------------------------------------
# Bags of views (Sec. 3.1) on disk
# -----------------------------------------------------------------------------
#
#   BAGS/<relative folder of the real image>/<image stem>/     one folder per real image
#       real.<ext>                  the real image (its original bytes)
#       view_00.jpg ... view_{M-1}  the M generated views
#
# `generate_views.py` writes this layout (mirroring the input tree); a bag is any folder
# holding a file named real.*. Files are written under a temporary name and renamed,
# so a name that matches below is always complete.

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIEW_NAME = re.compile(r"^view_(\d+)\.(jpg|jpeg|png|bmp|webp)$", re.IGNORECASE)


def bag_files(bag_dir):
    """(real image path or None, [view paths ordered by index]) of one bag folder."""
    real, views = None, {}
    for entry in os.scandir(bag_dir):
        name = entry.name
        if name.lower().startswith("real.") and name.lower().endswith(IMAGE_SUFFIXES):
            real = entry.path
        elif (match := VIEW_NAME.match(name)):
            views[int(match.group(1))] = entry.path
    return real, [views[k] for k in sorted(views)]


def find_bags(root):
    """Sorted relative paths of every bag folder (a folder holding real.*) under root."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: bag root is not a folder")
    bags = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(f.lower().startswith("real.") and f.lower().endswith(IMAGE_SUFFIXES) for f in filenames):
            bags.append(os.path.relpath(dirpath, root))
    return sorted(bags)


def _image_problem(path):
    """None if the file opens as an image (header check), else a short reason."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as im:
            im.size  # noqa: B018 -- parses the header
        return None
    except Exception as e:  # noqa: BLE001
        return f"unreadable ({type(e).__name__}: {e})"


def check_bags(root, bags, num_views, min_views, verify_images=True, threads=16):
    """Problems of the given bags as {bag: reason}: no real image, views missing among
    view_00..view_{num_views-1}, fewer than `min_views` images in all, or (verify_images)
    an image whose header cannot be read."""
    def check(bag):
        real, views = bag_files(Path(root) / bag)
        if real is None:
            return bag, "no real.* image"
        indices = [int(VIEW_NAME.match(os.path.basename(v)).group(1)) for v in views]
        if indices[:num_views] != list(range(num_views)):
            return bag, f"incomplete: has views {indices}, needs view_00..view_{num_views - 1:02d}"
        if 1 + num_views < min_views:
            return bag, f"{1 + num_views} images, needs at least {min_views}"
        if verify_images:
            for path in [real] + views[:num_views]:
                if (problem := _image_problem(path)):
                    return bag, f"{os.path.basename(path)}: {problem}"
        return bag, None

    with ThreadPoolExecutor(threads) as pool:
        return {bag: reason for bag, reason in pool.map(check, bags) if reason}


def load_rgb(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"{path}: cannot decode image ({e})") from e


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


def image_to_tensor(img):
    """PIL RGB -> ImageNet-normalised float tensor [3, H, W]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


class BagDataset(torch.utils.data.Dataset):
    """Samples (target, N anchors) from bags of views (Sec. 4, Table 2 and 6).

    An item is addressed by (epoch, index): everything random about it -- which view is
    the target, which N views are anchors, the crop box and flip shared by all of its
    views, and the masking noise -- is drawn from a generator seeded by (seed, epoch,
    index). So a sample does not depend on the worker, rank or world size that loads it,
    which makes resumed and multi-process runs reproduce single-process ones.

    target_choice: "any" (real or generated at random, the paper's default),
    "real" (always the real image) or "generated" (always a generated view).
    """

    def __init__(self, root, bags, num_views, num_anchors=1, input_size=224, target_choice="any",
                 crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3), num_patches=196, seed=0):
        self.root, self.bags = Path(root), list(bags)
        self.num_views, self.num_anchors = num_views, num_anchors
        self.input_size, self.target_choice = input_size, target_choice
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.num_patches, self.seed = num_patches, seed
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
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        bag = self.root / self.bags[index]
        real, views = bag_files(bag)
        paths = [real] + views[:self.num_views]
        chosen = self.choose_views(rng)
        images = [load_rgb(paths[i]) for i in chosen]
        # One crop box (relative to each image's size) and one flip for all views of the sample.
        box = sample_crop_box(rng, *images[0].size, self.crop_scale, self.crop_ratio)
        flip = rng.random() < 0.5
        tensors = []
        for img in images:
            w, h = img.size
            img = img.resize((self.input_size, self.input_size), Image.BICUBIC,
                             box=(box[0] * w, box[1] * h, box[2] * w, box[3] * h))
            if flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            tensors.append(image_to_tensor(img))
        target_noise = torch.from_numpy(rng.random(self.num_patches, dtype=np.float32))
        anchor_noise = torch.from_numpy(rng.random((self.num_anchors, self.num_patches), dtype=np.float32))
        return tensors[0], torch.stack(tensors[1:]), target_noise, anchor_noise


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's (epoch, index) keys, one global batch after another.

    Each epoch is a permutation of the bags seeded by (seed, epoch), cut into global
    batches of `global_batch` samples (the tail is dropped); rank r takes the r-th
    contiguous slice of each. `start_step` skips the global batches already trained
    on, to resume in the middle of an epoch.
    """

    def __init__(self, num_samples, global_batch, rank, world_size, epoch, seed=0, start_step=0):
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size = rank, world_size
        self.epoch, self.seed, self.start_step = epoch, seed, start_step
        self.steps = num_samples // global_batch

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


# -----------------------------------------------------------------------------
# Training (Sec. 4, Table 6): AdamW, warmup + per-iteration cosine, torchrun DDP
# -----------------------------------------------------------------------------

def checked(kind, low=None, high=None, *, low_open=False, high_open=False):
    """An argparse `type` that parses with `kind` (int or float) and holds the value to the range
    [low, high] (an end is excluded with low_open / high_open; None means unbounded). A bad value
    is one argparse error line naming the flag, e.g. "argument --topk: 0 is not >= 1"."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text} is not {'>' if low_open else '>='} {low}")
        if high is not None and (value >= high if high_open else value > high):
            raise argparse.ArgumentTypeError(f"{text} is not {'<' if high_open else '<='} {high}")
        return value
    parse.__name__ = kind.__name__
    return parse


def get_args_parser():
    p = argparse.ArgumentParser(
        description="CDG-MAE pre-training on bags of views (defaults: the paper's single-anchor "
                    "setting, Table 6). Run with python (one process) or torchrun (DDP).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", type=str, help="bag root (layout: see README, 'Bags of views')")
    g.add_argument("--views", type=int, default=None,
                   help="M generated views per bag to use (default: the largest count found; "
                        "a bag with fewer is an error)")
    g.add_argument("--target-view", choices=["any", "real", "generated"], default="any",
                   help="target chosen among all views of the bag / always the real image / "
                        "always a generated view (Table 2)")
    g.add_argument("--input-size", type=int, default=224, help="side of the square training crops (pixels)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.5, 1.0), help="random resized crop area")
    g.add_argument("--crop-ratio", type=float, nargs=2, default=(0.75, 1.33), help="crop aspect ratio range")
    g.add_argument("--workers", type=int, default=8, help="DataLoader worker processes per rank")
    g.add_argument("--verify-images", action=argparse.BooleanOptionalAction, default=True,
                   help="open every image's header at start-up (split over ranks)")

    g = p.add_argument_group("model")
    g.add_argument("--model", choices=sorted(VIT_SIZES), default="vit_small", help="encoder size")
    g.add_argument("--embed-dim", type=int, default=None, help="override the encoder width")
    g.add_argument("--depth", type=int, default=None, help="override the encoder depth")
    g.add_argument("--num-heads", type=int, default=None, help="override the encoder heads")
    g.add_argument("--patch-size", type=int, default=16, help="ViT patch size P (16: ViT-S/16, 8: ViT-S/8)")
    g.add_argument("--anchors", type=int, default=1, help="N anchors per target (Eq. 6-7)")
    g.add_argument("--anchor-mask", type=float, default=0.0, help="anchor mask ratio r_a (Eq. 6)")
    g.add_argument("--target-mask", type=float, default=0.9, help="target mask ratio r_t (Eq. 4)")
    g.add_argument("--decoder-dim", type=int, default=256, help="decoder width (Sec. 4)")
    g.add_argument("--decoder-depth", type=int, default=4, help="decoder blocks (Sec. 4)")
    g.add_argument("--decoder-heads", type=int, default=8, help="decoder attention heads")
    g.add_argument("--decoder-ffn-dim", type=int, default=2048, help="decoder feed-forward width (CropMAE)")
    g.add_argument("--decoder-dropout", type=float, default=0.1, help="decoder dropout (CropMAE)")
    g.add_argument("--decoder-block", choices=["cdgmae", "croco"], default="cdgmae",
                   help="decoder block: the paper's (CropMAE's post-norm cross-attn, FFN, self-attn) or "
                        "CroCo's pre-norm self-attn, cross-attn, MLP with memory position embeddings "
                        "(MLP ratio 4, no dropout: --decoder-ffn-dim/--decoder-dropout do not apply)")
    g.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="regress per-patch normalised pixels")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100, help="passes over the bags (Table 6)")
    g.add_argument("--batch-size", type=int, default=2048, help="global batch (all ranks, all accumulation steps)")
    g.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation steps per optimizer step")
    g.add_argument("--blr", type=float, default=1.5e-4, help="base lr; lr = blr * batch_size / 256")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--min-lr", type=float, default=0.0, help="lr at the end of the cosine")
    g.add_argument("--warmup-epochs", type=float, default=5, help="linear warmup (CropMAE: 5%% of 100 epochs)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (Table 6)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW betas (Table 6)")
    g.add_argument("--seed", type=int, default=0, help="seeds the initial weights, the data order and every sample's crop, views and masks")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    g.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this many optimizer steps")

    g = p.add_argument_group("output")
    g.add_argument("--output", type=str, default="runs/cdgmae", help="folder for checkpoints, log.jsonl, args.json and reconstruction PNGs")
    g.add_argument("--resume", type=str, default=None, help="checkpoint to continue from ('auto': OUTPUT/checkpoint-last.pth if present)")
    g.add_argument("--save-every", type=int, default=25, help="keep a copy of the checkpoint every this many epochs")
    g.add_argument("--vis-every", type=int, default=5, help="reconstruction PNG every this many epochs (0: never)")
    g.add_argument("--log-every", type=int, default=20, help="JSON-lines log every this many steps")
    g.add_argument("--count-flops", action="store_true",
                   help="print the GFLOPs of one 224x224 training sample (Table 8) and exit")
    return p


def model_config(args):
    """The CDGMAE constructor arguments implied by the command line (sizes resolved)."""
    embed_dim, depth, num_heads = VIT_SIZES[args.model]
    return dict(num_anchors=args.anchors, anchor_mask_ratio=args.anchor_mask,
                target_mask_ratio=args.target_mask, img_size=args.input_size, patch_size=args.patch_size,
                embed_dim=args.embed_dim or embed_dim, depth=args.depth or depth,
                num_heads=args.num_heads or num_heads, decoder_embed_dim=args.decoder_dim,
                decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_heads,
                decoder_ffn_dim=args.decoder_ffn_dim, decoder_dropout=args.decoder_dropout,
                norm_pix_loss=args.norm_pix_loss, decoder_block=args.decoder_block)


def learning_rate(args, epoch_float):
    """Linear warmup, then half-cycle cosine to min_lr; evaluated every iteration (MAE)."""
    if epoch_float < args.warmup_epochs:
        return args.lr * epoch_float / args.warmup_epochs
    progress = (epoch_float - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases and 1-D parameters (norms, cls/mask tokens)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "mask_token")
         else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def temporary_path(path):
    """A hidden temporary name beside `path`, unique to this process on this host:
    ".<name>.<host>-<pid>.tmp". It matches no bag, frame or checkpoint pattern, two processes
    writing the same file never share it, and `remove_stale_temporaries` can tell a killed
    writer's leftovers from a live one's."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")


TEMPORARY_NAME = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.tmp$")


def remove_stale_temporaries(folder):
    """Delete the temporaries (see `temporary_path`) in `folder` whose writer is gone: this
    host's processes that no longer run. Another host's temporaries are left alone (their
    writer may be alive). Returns the number removed."""
    removed, host = 0, socket.gethostname()
    for entry in os.scandir(folder) if os.path.isdir(folder) else ():
        match = TEMPORARY_NAME.match(entry.name)
        if match and match["host"] == host and not _process_alive(int(match["pid"])):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def atomic_write(path, write):
    """Call write(tmp) on a temporary name beside `path` (`temporary_path`), then rename it to
    `path`, so that a file under its final name is always complete and two processes writing
    the same file never clash. An error removes the temporary file; a killed process leaves
    it, hidden, for `remove_stale_temporaries`. Used for checkpoints, bags and CSVs."""
    tmp = temporary_path(path)
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def plain(value):
    """argparse values -> JSON/weights_only-safe plain Python (tuples become lists)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


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


def scan_bag_root(args, rank, world_size):
    """List the bags, check every one of them (split over ranks) and fail with their names
    before any training if one is unreadable or incomplete. Returns (bags, num_views)."""
    bags = find_bags(args.data) if rank == 0 else None
    if world_size > 1:
        box = [bags]
        dist.broadcast_object_list(box, src=0)
        bags = box[0]
    if not bags:
        raise SystemExit(f"{args.data}: no bags found (a bag is a folder holding real.* and view_NN.jpg files)")
    num_views = args.views
    if num_views is None:  # infer M from the first bags; check_bags then holds every bag to it
        num_views = max(len(bag_files(Path(args.data) / b)[1]) for b in bags[:1000])
    problems = check_bags(args.data, bags[rank::world_size], num_views, 1 + args.anchors,
                          verify_images=args.verify_images)
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, problems)
        problems = {k: v for part in gathered for k, v in part.items()}
    if args.target_view == "real" and num_views < args.anchors:
        problems["(all)"] = f"--target-view real needs at least {args.anchors} generated views, bags have {num_views}"
    if problems:
        lines = [f"  {Path(args.data) / bag}: {why}" for bag, why in sorted(problems.items())[:20]]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise SystemExit(f"{args.data}: {len(problems)} of {len(bags)} bags cannot be used "
                         f"(M = {num_views} views, N = {args.anchors} anchors):\n" + "\n".join(lines) + more)
    return bags, num_views


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.count_flops:
        counts = count_flops(CDGMAE(**{**model_config(args), "img_size": 224}))
        print(f"N={args.anchors} r_a={args.anchor_mask:g} r_t={args.target_mask:g}: "
              f"{counts['fvcore'] / 1e9:.2f} GFLOPs per sample (fvcore: Linear+Conv multiply-adds "
              f"{(counts['linear'] + counts['conv']) / 1e9:.3f} G, LayerNorm {counts['layernorm'] / 1e9:.3f} G; "
              f"attention products, not counted: {counts['attention'] / 1e9:.3f} G)")
        return counts
    if not args.data:
        raise SystemExit("--data BAGS is required (or --count-flops)")

    rank, world_size, device = setup_distributed()
    per_step = args.batch_size // (world_size * args.accum_iter)
    if per_step * world_size * args.accum_iter != args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {world_size} ranks x "
                         f"{args.accum_iter} accumulation steps")
    args.lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256
    output = Path(args.output)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)

    bags, num_views = scan_bag_root(args, rank, world_size)
    steps_per_epoch = len(bags) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{args.data}: {len(bags)} bags is fewer than one global batch of {args.batch_size}")
    config = model_config(args)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = CDGMAE(**config).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=tuple(args.betas))

    start_epoch, start_step = 0, 0
    resume = output / "checkpoint-last.pth" if args.resume == "auto" else args.resume
    if resume and (args.resume != "auto" or Path(resume).exists()):
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, start_step = ckpt["next_epoch"], ckpt["next_step"]
        if rank == 0:
            print(f"resumed from {resume}: epoch {start_epoch}, step {start_step} of {steps_per_epoch}")
            changed = [f"{k}: {ckpt['args'][k]} -> {plain(getattr(args, k))}"
                       for k in ("batch_size", "seed", "epochs", "lr", "warmup_epochs", "target_view", "views")
                       if k in ckpt["args"] and ckpt["args"][k] != plain(getattr(args, k))]
            if changed:
                print("warning: the run continues with other settings than the checkpoint's, so it will not "
                      "replay the uninterrupted run: " + "; ".join(changed))

    train_model = model
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    use_bf16 = device.type == "cuda"  # bf16 autocast on GPU; float32 on CPU (bf16 is ~30x slower there)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    dataset = BagDataset(args.data, bags, num_views, args.anchors, args.input_size, args.target_view,
                         tuple(args.crop_scale), tuple(args.crop_ratio), model.num_patches, args.seed)
    if rank == 0:
        counts = count_flops(CDGMAE(**{**config, "decoder_dropout": 0.0}))
        print(f"{len(bags)} bags of 1 real + {num_views} views; {world_size} rank(s) x {per_step} samples x "
              f"{args.accum_iter} accumulation = global batch {args.batch_size}; {steps_per_epoch} steps/epoch; "
              f"lr {args.lr:.3g}; {counts['fvcore'] / 1e9:.3g} GFLOPs/sample (fvcore)")
        with open(output / "args.json", "w") as f:
            json.dump({k: plain(v) for k, v in vars(args).items()}, f, indent=2)

    log_file = open(output / "log.jsonl", "a") if rank == 0 else None
    global_step = start_epoch * steps_per_epoch + start_step
    try:
        for epoch in range(start_epoch, args.epochs):
            sampler = GlobalBatchSampler(len(bags), args.batch_size, rank, world_size, epoch, args.seed,
                                         start_step if epoch == start_epoch else 0)
            loader = torch.utils.data.DataLoader(dataset, batch_size=per_step, sampler=sampler,
                                                 num_workers=args.workers, pin_memory=device.type == "cuda",
                                                 drop_last=False, persistent_workers=False)
            batches = iter(loader)
            first = start_step if epoch == start_epoch else 0
            bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch}", disable=rank != 0,
                       dynamic_ncols=True, initial=first, total=steps_per_epoch)
            model.train()
            t_last, seen, loss_steps = time.time(), 0, 0
            loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
            for step in bar:
                lr = learning_rate(args, epoch + step / steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # Dropout (and any other model-side randomness) is a function of (seed, rank, step),
                # so a resumed run replays exactly what an uninterrupted one would have drawn.
                torch.manual_seed(args.seed * 1_000_003 + global_step * 1009 + rank)
                for micro in range(args.accum_iter):
                    target, anchors, target_noise, anchor_noise = [t.to(device, non_blocking=True)
                                                                   for t in next(batches)]
                    sync = micro == args.accum_iter - 1 or world_size == 1
                    with (contextlib.nullcontext() if sync else train_model.no_sync()), \
                            torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        loss, pred, mask = train_model(target, anchors, target_noise, anchor_noise)
                    (loss / args.accum_iter).backward()
                    loss_sum += loss.detach() / args.accum_iter
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                loss_steps += 1
                seen += args.batch_size
                if global_step % args.log_every == 0 or step == steps_per_epoch - 1:
                    if world_size > 1:  # the mean over all ranks' samples
                        dist.all_reduce(loss_sum)
                        loss_sum /= world_size
                    now = time.time()
                    record = {"epoch": epoch, "step": global_step, "lr": lr, "loss": loss_sum.item() / loss_steps,
                              "samples_per_s": seen / max(now - t_last, 1e-9)}
                    if rank == 0:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                        samples_per_s=f"{record['samples_per_s']:.1f}")
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    t_last, seen, loss_steps = now, 0, 0
                    loss_sum.zero_()
                stop = args.max_steps is not None and global_step >= args.max_steps
                if stop:
                    break
            finished_epoch = step == steps_per_epoch - 1
            if rank == 0:
                next_epoch, next_step = (epoch + 1, 0) if finished_epoch else (epoch, step + 1)
                ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "next_epoch": next_epoch, "next_step": next_step, "global_step": global_step,
                        "args": {**{k: plain(v) for k, v in vars(args).items()}, **config}}
                atomic_write(output / "checkpoint-last.pth", lambda tmp: torch.save(ckpt, tmp))
                if finished_epoch and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs):
                    atomic_write(output / f"checkpoint-{epoch + 1:04d}.pth", lambda tmp: torch.save(ckpt, tmp))
                if finished_epoch and args.vis_every and ((epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs):
                    reconstruction_image(model, target, anchors, pred.detach(), mask).save(
                        output / f"reconstruction-{epoch + 1:04d}.png")
            if stop:
                break
    finally:
        if log_file:
            log_file.close()
        if world_size > 1:
            dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main()
