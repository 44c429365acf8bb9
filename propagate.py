"""Training-free label propagation with k-NN on ViT patch features (Sec. 4, A.1.2, Table 7).

The first frame's labels (object masks on DAVIS-2017, body parts on VIP, 15 joints on
JHMDB) are carried through the video by matching patch features, without any training.
The paper follows "the evaluation protocol of previous works [11, 15]" and uses "the
evaluation codebase released by CropMAE" (A.1.2), which is CRW's (videowalk) label
propagation. Every step below was checked against that public code (read, not copied):

  Frames    decoded with Pillow as RGB, scaled to [0, 1], resized with bilinear interpolation
            WITHOUT antialiasing (half-pixel centres, edge clamped: OpenCV's INTER_LINEAR,
            which CRW uses), normalised with the ImageNet mean and std.
  Sizes     (height, width) DAVIS 480x880, JHMDB 320x320 (both stretched, aspect not kept);
            VIP: long side 880, short side = int(short * 880 / long) floored to a multiple
            of 64. Any size must be a multiple of the patch size.
  Features  the encoder's last block after its final norm, cls token dropped, L2-normalised
            over channels: [T, C, H/P, W/P]. The position embedding is resized bicubically
            to the frame's grid the way CropMAE's (and DINO's) ViT does it, with
            scale_factor (g + 0.1) / g0 rather than an output size
            (cdgmae.interpolate_pos_embed).
  Labels    DAVIS / VIP: the first annotation, DAVIS void (255) set to background (as the
            official scorer counts it; a propagated 255 would stop that scorer), is resized
            to the input size by nearest neighbour (OpenCV's INTER_NEAREST: source index
            floor(x * (1 / (out / in))) in double precision), split into one channel per id
            present in it (background included), and each channel is resized to the feature
            grid bilinearly (no antialiasing), so labels are soft.
            JHMDB: pos_img - 1 (0-based pixels) is mapped to the grid by x * w / W, y * h / H;
            each joint becomes a Gaussian of sigma 0.5 cells (peak 1, drawn in a 4x4 window
            as CRW's draw_labelmap_np does) plus a background channel that is 1 where no
            joint has mass.
  Context   for frame t: frame 0 (its given labels, kept for the whole video) and the
            `queue_length` previous frames with their soft predictions; before frame
            `queue_length` the missing ones are copies of frame 0 (the video is padded in
            front with copies of frame 0).
  k-NN      affinity = query . key; keys of the queue frames at a distance >= `radius`
            cells (Euclidean) from the query are excluded, frame 0's memory is not;
            divide by the temperature; top-k over ALL context keys jointly; softmax over
            those k; the prediction is the weighted sum of their soft labels
            (`label_propagation`, line by line; `label_propagation_fast` runs it).
  Output    DAVIS / VIP: soft labels resized bilinearly to the input size, argmax, then
            resized to the annotation size by nearest neighbour (DAVIS: OpenCV's rule, as
            CRW's convert_davis.py; VIP: PIL's rule, as CRW's eval_vip.py) and written as
            palette PNGs (DAVIS) or class-id PNGs (VIP). JHMDB: per joint, the 5 cells of
            highest mass, their coordinates averaged with those masses as weights; an
            all-zero map means "not visible"; cell -> pixel by x * W / w, y * H / h.

Table 7 (per dataset, every one can be overridden): top-k 7 / 10 / 7 (DAVIS / VIP /
JHMDB), queue 20, neighbourhood radius 20, temperature 0.7 (CropMAE's default).

Before any work every flag is range-checked when parsed, and every video is checked with
evaluate.py's rules (label formats and sizes, DAVIS ids 0..K, VIP classes 0..19, JHMDB
pos_img 2x15xT): a bad input is one line `path: what is wrong (what to do)`. The output
folder records the settings and the sha256 of the checkpoint file in propagation.json; a
rerun resumes only with the same settings and checkpoint contents, and removes what killed
runs left (hidden temporaries and partial video folders of dead processes).

What you may copy: the file reads as the protocol (features, the k-NN, pre- and
post-processing, a benchmark run, DIFT, your own video), then come the output records, the
visualisation and the command line; the plumbing (flags, one-line errors, atomic writes,
settings records) comes from common.py. `label_propagation`, the k-NN as the table reads
(with `neighbourhood_mask` and `context_frames`), and its fast path `label_propagation_fast`
(chunked, tested equal to it) need only torch: features [T, C, h, w] of any encoder and the
first frame's soft labels. A feature extractor is a module from frames [B, 3, H, W] to
L2-normalised features [B, C, H/s, W/s] with `patch_size` (s) and `embed_dim` (C):
`ViTFeatures` makes one of a ViT with `forward_features` (`extract_features`;
cdgmae.VisionTransformer resizes its position embedding to the frame's grid);
`DiftFeatures` is one, and needs a diffusers UNet, VQ or KL autoencoder and scheduler
(`load_dift` reads them from a model folder; transformers for a Stable Diffusion one). Of
the pre- and post-processing, `input_size_for`, `nearest_source_index` and `resize_nearest`
need only numpy; `segmentation_labels`, `labels_to_ids`, `joint_heatmaps` and
`decode_joints` numpy and torch; `load_frame` common.load_rgb and cdgmae.image_to_tensor.
`propagate_dataset` (a benchmark) and `propagate_own_video` (your clip) drive the rest and
read and write files with evaluate.py and common.py (PyAV for video files).

Usage:
    python propagate.py --dataset davis --data-root DAVIS --checkpoint ckpt.pth --output runs/davis
    python propagate.py --dataset vip --data-root VIP_Fine --checkpoint ckpt.pth --output runs/vip --visualize
    python propagate.py --dataset jhmdb --data-root JHMDB --checkpoint dino_deitsmall16_pretrain.pth
        --output runs/jhmdb --list jhmdb_vallist.txt --evaluate          (one command)
    # DIFT features of a diffusion model folder, with DIFT's settings (App. C.3) as defaults
    python propagate.py --dataset davis --data-root DAVIS --checkpoint sldm/ --features dift --output runs/dift
    # your own clip: a folder of frames or a video file, and the first frame's mask (or keypoints)
    python propagate.py --video clip.mp4 --first-mask first.png --checkpoint ckpt.pth --output runs/clip

Import:
    from propagate import label_propagation, load_dift, load_encoder, propagate_dataset, propagate_own_video
    labels = label_propagation(features, first_labels, topk=7, queue_length=20, radius=20, temperature=0.7)
"""
import argparse
import hashlib
import json
import os
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import evaluate as ev
from cdgmae import IMAGENET_MEAN, IMAGENET_STD, check_finite, encoder_from_checkpoint, image_to_tensor
from common import (DIFFUSION_FOLDER_FILES, EXPECTED_OS_ERRORS, exit_on_expected_errors, HelpFormatter, InputError, UnreadableImage, atomic_write, check_image,
                    check_output_folder, check_outside, checked, file_sha256, list_files, load_rgb,
                    one_line, read_record, refuse_other_settings, remove_stale_temporaries, run_command,
                    temporary_path, write_json)

# Table 7 and CropMAE's input sizes. input_size: (height, width), or (long side,).
PROTOCOL = {
    "davis": dict(topk=7, queue_length=20, radius=20, temperature=0.7, input_size=(480, 880)),
    "vip": dict(topk=10, queue_length=20, radius=20, temperature=0.7, input_size=(880,)),
    "jhmdb": dict(topk=7, queue_length=20, radius=20, temperature=0.7, input_size=(320, 320)),
}
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny  # a lower one overflows score / temperature (<= 1 / it): NaN labels
JHMDB_SIGMA = 0.5        # Gaussian width of a joint on the feature grid, in cells
JHMDB_DECODE_TOPK = 5    # cells averaged to read a joint's position back


# -----------------------------------------------------------------------------
# Features
# -----------------------------------------------------------------------------
#
# A feature extractor is a module that maps frames [B, 3, H, W] (ImageNet-normalised, as
# load_frame gives them) to L2-normalised features [B, C, H/s, W/s], with `patch_size` = s
# (its stride in pixels), `embed_dim` = C and `description()` (what propagation.json records
# about it). A ViT becomes one through ViTFeatures; DiftFeatures ("DIFT features" below) is
# one itself and also brings its own `protocol` (the defaults of its settings).

def load_encoder(checkpoint, num_heads=None):
    """A VisionTransformer loaded strictly from a checkpoint of CDG-MAE, MAE, CropMAE or DINO
    (cdgmae.encoder_from_checkpoint: layouts, heads). Its stored position-embedding grid is
    kept, so the only resize is the one to each frame's grid."""
    return encoder_from_checkpoint(checkpoint, num_heads=num_heads).eval()


@torch.no_grad()
def extract_features(vit, frames):
    """frames [B, 3, H, W] (normalised) -> L2-normalised patch features [B, C, H/P, W/P] of the
    last block after the final norm, cls token dropped. The ViT resizes its position
    embedding to the frame's grid as CropMAE's evaluation does (cdgmae.interpolate_pos_embed)."""
    B, _, H, W = frames.shape
    P = vit.patch_size
    tokens = vit.forward_features(frames)                                  # [B, 1 + (H/P)(W/P), C]
    features = tokens[:, 1:].reshape(B, H // P, W // P, -1).permute(0, 3, 1, 2)
    return F.normalize(features, dim=1)


class ViTFeatures(nn.Module):
    """A ViT as a feature extractor: extract_features(vit, frames). `vit` is anything with
    `forward_features` (tokens, cls first), `patch_size`, `embed_dim`, `depth` and `num_heads`:
    cdgmae.VisionTransformer, a CDGMAE, demo.py's RawPixels."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit
        self.patch_size, self.embed_dim = vit.patch_size, vit.embed_dim

    def description(self):
        return dict(embed_dim=self.vit.embed_dim, depth=self.vit.depth, num_heads=self.vit.num_heads,
                    patch_size=self.vit.patch_size)

    def forward(self, frames):
        return extract_features(self.vit, frames)


def feature_extractor(encoder):
    """`encoder` as a feature extractor: a ViT (it has forward_features) wrapped in ViTFeatures;
    a module that already is one (DiftFeatures) as it is."""
    return ViTFeatures(encoder) if hasattr(encoder, "forward_features") else encoder


# -----------------------------------------------------------------------------
# Label propagation (the k-NN of A.1.2, Table 7)
# -----------------------------------------------------------------------------

def neighbourhood_mask(h, w, radius, device=None):
    """[h*w, h*w] bool: cell j lies strictly within `radius` cells (Euclidean) of cell i."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.reshape(-1).double(), xs.reshape(-1).double()
    dist = ((ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2).sqrt()
    return dist < radius


def context_frames(t, queue_length):
    """Frame indices whose labels predict frame t: [0] (the long-term memory), then the
    queue_length previous frames, oldest first, with frame 0 standing in before the start."""
    return [0] + [max(s, 0) for s in range(t - queue_length, t)]


@torch.no_grad()
def label_propagation(features, first_labels, *, topk, queue_length, radius, temperature):
    """Propagate frame 0's soft labels through a video: the protocol's k-NN, as it reads.

    features [T, C, h, w] (L2-normalised over C), first_labels [K, h, w]
    -> soft labels [T, K, h, w]; frame 0 is first_labels itself.

    Frame t (>= 1) reads the context frames [0] + the queue_length previous ones (frame 0
    repeated before the start). Each query cell scores every context key by dot product;
    keys of the queue frames (not of the long-term frame 0) at distance >= radius are
    excluded; scores are divided by the temperature; the top-k over all context keys
    together are softmaxed and their labels averaged with those weights. propagate.py
    runs label_propagation_fast: the same result with less work and bounded memory.
    """
    T, C, h, w = features.shape
    K = first_labels.shape[0]
    feats = features.reshape(T, C, h * w)
    labels = [first_labels.reshape(K, h * w).to(features)]                 # frame 0: the given labels
    near = neighbourhood_mask(h, w, radius, features.device)              # [h*w queries, h*w keys]
    for t in range(1, T):
        context = context_frames(t, queue_length)                         # frame 0, then the queue: N frames
        N = len(context)
        keys = feats[context]                                             # [N, C, h*w]
        key_labels = torch.stack([labels[s] for s in context])            # [N, K, h*w]
        affinity = feats[t].T @ keys                                      # [N, h*w queries, h*w keys]: cosines
        affinity[1:].masked_fill_(~near, float("-inf"))                   # queue frames: keys within the radius only
        scores = affinity.permute(1, 0, 2).reshape(h * w, N * h * w) / temperature  # [queries, all context keys]
        top, index = scores.topk(topk, dim=1)                             # top-k over all context keys jointly
        weights = top.softmax(dim=1)                                      # [h*w, k]
        neighbour_labels = key_labels.permute(1, 0, 2).reshape(K, N * h * w)[:, index]  # [K, h*w, k]
        labels.append((neighbour_labels * weights).sum(-1))               # weighted sum: [K, h*w]
    return torch.stack(labels).reshape(T, K, h, w)


@torch.no_grad()
def label_propagation_fast(features, first_labels, *, topk, queue_length, radius, temperature,
                           max_chunk_bytes=2 ** 28, on_frame=None):
    """label_propagation's result with less work and bounded memory: the one propagate.py runs.

    Same arguments and result (tests/test_propagate.py compares them), plus: a frame repeated
    in the context (frame 0 early in the video) is multiplied with the queries once and
    copied; the temperature is applied to the k selected scores only (dividing by it does not
    change the order); queries are processed in chunks of at most max_chunk_bytes of
    affinities, in reused buffers. `on_frame(t)` is called after each frame (progress bars).
    """
    T, C, h, w = features.shape
    K, hw = first_labels.shape[0], h * w
    if first_labels.shape[1:] != (h, w):
        raise ValueError(f"labels {tuple(first_labels.shape)} do not match the feature grid {(h, w)}")
    feats = features.reshape(T, C, hw)
    labels = features.new_zeros(T, K, hw)
    labels[0] = first_labels.reshape(K, hw).to(features)
    far = ~neighbourhood_mask(h, w, radius, features.device)  # [query, key]: excluded for queue keys
    N = 1 + queue_length
    chunk = max(1, min(hw, max_chunk_bytes // (features.element_size() * N * hw)))
    products = features.new_empty(chunk * N * hw)  # query x unique-context-frame scores
    scores = features.new_empty(chunk * N * hw)    # query x context-key scores
    for t in range(1, T):
        ctx = context_frames(t, queue_length)
        unique = sorted(set(ctx))
        keys = feats[unique].permute(1, 0, 2).reshape(C, len(unique) * hw)   # [C, U*hw]
        ctx_labels = labels[ctx].permute(1, 0, 2).reshape(K, N * hw)          # [K, N*hw]
        slot = torch.tensor([unique.index(c) for c in ctx], device=features.device)
        queries = feats[t].T                                                   # [hw, C]
        for q0 in range(0, hw, chunk):
            n = min(hw, q0 + chunk) - q0
            aff = torch.mm(queries[q0:q0 + n], keys, out=products[:n * len(unique) * hw].view(n, -1))
            aff = aff.view(n, len(unique), hw)
            if len(unique) < N:  # copy the repeated frames' scores into their slots
                aff = torch.index_select(aff, 1, slot, out=scores[:n * N * hw].view(n, N, hw))
            aff[:, 1:].masked_fill_(far[q0:q0 + n, None, :], float("-inf"))  # queue frames only
            top, index = aff.view(n, N * hw).topk(topk, dim=1)                  # [n, k]
            weights = (top / temperature).softmax(dim=1)
            labels[t, :, q0:q0 + n] = (ctx_labels[:, index] * weights).sum(-1)  # [K, n, k] -> [K, n]
        if on_frame is not None:
            on_frame(t)
    return labels.reshape(T, K, h, w)


# -----------------------------------------------------------------------------
# Pre- and post-processing
# -----------------------------------------------------------------------------

def input_size_for(height, width, input_size, multiple=64):
    """(H, W) the frames are resized to: input_size itself if it is (H, W); for (L,) the long
    side becomes L and the short side int(short * L / long), floored to `multiple` (CRW)."""
    if len(input_size) == 2:
        return int(input_size[0]), int(input_size[1])
    (long_side,) = input_size
    if width > height:
        new_h = int(height * long_side / width)
        return int((new_h // multiple) * multiple), int(long_side)
    new_w = int(width * long_side / height)
    return int(long_side), int((new_w // multiple) * multiple)


def load_frame(path, size):
    """One frame -> [3, H, W] ImageNet-normalised at `size` (bilinear, no antialiasing)."""
    try:
        image = load_rgb(path)
    except RuntimeError as e:  # common.load_rgb: "path: cannot decode image (...)"
        raise InputError(f"{one_line(e)} (replace the frame; finished videos are kept)") from None
    x = image_to_tensor(image)
    if tuple(x.shape[-2:]) != tuple(size):
        # Bilinear is affine per channel, so normalising first changes nothing.
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]
    return x


def video_features(extractor, frames, size, batch_size=8, device="cpu", on_frame=None):
    """Features [T, C, H/s, W/s] of a list of frame paths, extracted batch by batch by a
    feature extractor (see "Features")."""
    first = None
    chunks = []
    for b in range(0, len(frames), batch_size):
        batch = []
        for path in frames[b:b + batch_size]:
            with Image.open(path) as im:
                if first is None:
                    first = im.size
                elif im.size != first:
                    raise ValueError(f"{path}: frame size {im.size} differs from the first frame's {first}")
            batch.append(load_frame(path, size))
        chunks.append(extractor(torch.stack(batch).to(device)))
        if on_frame is not None:
            on_frame(len(batch))
    return torch.cat(chunks)


def nearest_source_index(n_in, n_out):
    """[n_out] int64: the source index of each output along an axis of n_in, as OpenCV's
    INTER_NEAREST computes it: floor(x * (1 / (n_out / n_in))) in double precision, clipped
    to n_in - 1. (torch's float32 mode='nearest' picks another index for about 10% of size
    pairs, e.g. 720 -> 448.)"""
    scale = 1.0 / (n_out / n_in)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float64) * scale).astype(np.int64), n_in - 1)


def resize_nearest(ids, size):
    """[H, W] id map -> [h, w] (same dtype) by OpenCV's INTER_NEAREST rule (nearest_source_index
    along each axis); tests/test_propagate.py compares it with the formula and cv2.resize."""
    ids = np.asarray(ids)
    rows = nearest_source_index(ids.shape[0], int(size[0]))
    cols = nearest_source_index(ids.shape[1], int(size[1]))
    return ids[rows[:, None], cols[None, :]]


def segmentation_labels(first_ids, input_size, grid):
    """First annotation [Ha, Wa] -> (label values [K] (sorted ids present), soft labels
    [K, h, w]): nearest resize to the input size, one channel per id, bilinear to the grid."""
    ids = torch.from_numpy(resize_nearest(first_ids, input_size).astype(np.int64))
    values = torch.unique(ids)
    onehot = (ids[None] == values[:, None, None]).float()  # [K, H, W]
    soft = F.interpolate(onehot[None], size=grid, mode="bilinear", align_corners=False, antialias=False)[0]
    return values.numpy().astype(np.uint8), soft


def labels_to_ids(soft, values, input_size):
    """Soft labels [K, h, w] -> id map [H, W] uint8 at the input size (bilinear, argmax; the
    first maximum wins a tie)."""
    up = F.interpolate(soft[None].float(), size=input_size, mode="bilinear", align_corners=False)[0]
    return values[up.argmax(0).cpu().numpy()]


def joint_heatmaps(xy, grid, sigma=JHMDB_SIGMA):
    """Joint coordinates on the feature grid [J, 2] (x, y) -> labels [1 + J, h, w]: a
    background channel (1 where no joint has mass) then one Gaussian per joint.

    As CRW's draw_labelmap_np (the pose-hg-train drawing code): a window of 6*sigma + 1
    cells whose top-left corner is int(pt - 3*sigma) (int truncates toward zero), holding
    exp(-d^2 / (2 sigma^2)) around its own centre cell; nothing is drawn for a window
    wholly outside the grid."""
    h, w = grid
    maps = np.zeros((len(xy), h, w))
    size = 6 * sigma + 1
    g = np.arange(0, size, 1, float)
    centre = size // 2
    gaussian = np.exp(-((g[None, :] - centre) ** 2 + (g[:, None] - centre) ** 2) / (2 * sigma ** 2))
    for j, (x, y) in enumerate(np.asarray(xy, dtype=np.float64)):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        left, top = int(x - 3 * sigma), int(y - 3 * sigma)
        right, bottom = int(x + 3 * sigma + 1), int(y + 3 * sigma + 1)
        if left >= w or top >= h or right < 0 or bottom < 0:
            continue
        gx0, gx1 = max(0, -left), min(right, w) - left
        gy0, gy1 = max(0, -top), min(bottom, h) - top
        maps[j, max(0, top):min(bottom, h), max(0, left):min(right, w)] = gaussian[gy0:gy1, gx0:gx1]
    background = (maps.sum(0) == 0).astype(np.float64)[None]
    return torch.from_numpy(np.concatenate([background, maps])).float()


def decode_joints(soft, topk=JHMDB_DECODE_TOPK):
    """Soft labels [1 + J, h, w] (background first) -> joint positions [J, 2] (x, y) on the grid:
    the mass-weighted mean of each joint's top-k cells; NaN for a joint whose map is zero."""
    maps = soft[1:].flatten(1).T.double()  # [h*w, J]
    w = soft.shape[-1]
    values, index = maps.topk(min(topk, maps.shape[0]), dim=0)  # [k, J]
    total = values.sum(0)
    weights = values / torch.where(total > 0, total, torch.ones_like(total))
    x = ((index % w).double() * weights).sum(0)
    y = (torch.div(index, w, rounding_mode="floor").double() * weights).sum(0)
    xy = torch.stack([x, y], dim=1)
    xy[maps.sum(0) == 0] = float("nan")
    return xy.cpu().numpy()


# -----------------------------------------------------------------------------
# A benchmark run: propagate each video, write the predictions (every video is checked
# first: prepare_videos, under "Records and checks")
# -----------------------------------------------------------------------------

@torch.no_grad()
def propagate_video(dataset, extractor, frames, extra, size, final, settings, device, progress=True):
    """Propagate one video with a feature extractor and label_propagation_fast, and write its
    predictions atomically to `final` (a folder of PNGs, renamed into place when complete, or
    a .mat file)."""
    P = extractor.patch_size
    grid = (size[0] // P, size[1] // P)
    T = len(frames)
    bar = tqdm(total=3 * T, desc=final.name if dataset != "jhmdb" else final.parent.name, leave=False,
               disable=not progress)
    try:
        features = video_features(extractor, frames, size, settings["batch_size"], device, on_frame=bar.update)
        if dataset == "jhmdb":
            with Image.open(frames[0]) as im:
                width, height = im.size
            joints0 = extra[0]  # [15, 2] pixels, 0-based
            on_grid = joints0 * np.array([grid[1] / width, grid[0] / height])
            first = joint_heatmaps(on_grid, grid)
        else:
            first_ids = ev.read_label_png(extra[0])
            if dataset == "davis":
                first_ids[first_ids == ev.DAVIS_VOID] = 0  # void is background to the official scorer
            values, first = segmentation_labels(first_ids, size, grid)
        bar.update(1)
        soft = label_propagation_fast(features, first.to(device), topk=settings["topk"],
                                      queue_length=settings["queue_length"], radius=settings["radius"],
                                      temperature=settings["temperature"], on_frame=lambda t: bar.update(1))
        if dataset == "jhmdb":
            xy = np.stack([decode_joints(s) for s in soft]) * np.array([width / grid[1], height / grid[0]])
            ev.write_joints_mat(final, xy)
            bar.update(T)
            return
        tmp = temporary_path(final, "partial")
        tmp.mkdir(parents=True)
        try:
            write_segmentation_pngs(dataset, soft, values, size, frames, extra, tmp, on_frame=bar.update)
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            # another process finished this video first (the rename found its folder): keep that one
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        bar.close()


def write_segmentation_pngs(dataset, soft, values, size, frames, annotations, folder, on_frame=None):
    """Soft labels [T, K, h, w] -> one PNG per frame in `folder`, at the annotation's size:
    DAVIS palette PNGs (OpenCV nearest, as CRW's convert_davis.py), VIP class-id PNGs (PIL
    nearest, as CRW's eval_vip.py)."""
    with Image.open(annotations[0]) as im:
        out_w, out_h = im.size  # every annotation has its frame's size, and frames share one
    for t in range(len(frames)):
        ids = labels_to_ids(soft[t], values, size)
        if dataset == "davis":
            ev.write_palette_png(folder / f"{Path(frames[t]).stem}.png", resize_nearest(ids, (out_h, out_w)))
        else:
            image = Image.fromarray(ids, mode="L")
            if image.size != (out_w, out_h):
                image = image.resize((out_w, out_h), Image.NEAREST)
            ev.write_class_png(folder / f"{Path(frames[t]).stem}.png", np.array(image))
        if on_frame is not None:
            on_frame(1)


def output_path(dataset, output, name):
    """Where a finished video's predictions live (its existence marks the video as done)."""
    if dataset == "jhmdb":
        return Path(output) / name / "joint_positions.mat"
    return Path(output) / name


def propagate_dataset(dataset, data_root, encoder, output, *, topk=None, queue_length=None, radius=None,
                      temperature=None, input_size=None, size_multiple=64, list_file=None, videos=None,
                      subset="val", resolution="480p", batch_size=8, device=None, num_heads=None,
                      visualize=False, visualize_frames=6, progress=True):
    """Propagate the first-frame labels of every video of a benchmark and write the predictions
    under `output` in the formats evaluate.py (and the official evaluators) read.

    encoder: a checkpoint path, a ViT (a module with forward_features: cdgmae.VisionTransformer)
    or a feature extractor (DiftFeatures). Settings left None take the paper's values for the
    dataset (PROTOCOL), or the extractor's own `protocol` (DiftFeatures: DIFT's). Every video
    is checked first (prepare_videos). Finished videos are skipped, so a rerun resumes; the
    settings and a sha256 of the checkpoint file (of the weights for a module) are recorded in
    output/propagation.json, and a rerun into the same folder with other settings or another
    checkpoint content is refused. Leftovers of killed runs are removed. Returns
    {"settings", "written", "skipped"}.
    """
    if dataset not in PROTOCOL:
        raise InputError(f"unknown dataset {dataset!r} (expected one of {', '.join(ev.DATASETS)})")
    defaults = getattr(encoder, "protocol", PROTOCOL)[dataset]
    given = dict(topk=topk, queue_length=queue_length, radius=radius, temperature=temperature, input_size=input_size)
    settings = dict(dataset=dataset, checkpoint=None, checkpoint_sha256=None,
                    **{k: defaults[k] if v is None else v for k, v in given.items()},  # 0 is a value, not "unset"
                    size_multiple=size_multiple, resolution=resolution, batch_size=batch_size)
    settings["input_size"] = list(settings["input_size"])
    check_settings(settings)
    try:  # the output is a writable folder, outside the dataset (the next step reads the dataset)
        check_output_folder(output)
        check_outside(output, data_root, "--output", "--data-root")
    except ValueError as e:
        raise InputError(str(e)) from None
    names = videos or ev.list_videos(dataset, data_root, list_file, subset)
    if isinstance(encoder, (str, Path)):
        settings["checkpoint"] = str(Path(encoder).resolve())
        encoder, settings["checkpoint_sha256"] = load_checkpoint_encoder(encoder, num_heads)
    else:
        settings["checkpoint"] = getattr(encoder, "folder", None)  # DiftFeatures: the model folder
        settings["checkpoint_sha256"] = weights_sha256(encoder)
    extractor = feature_extractor(encoder)
    settings["encoder"] = extractor.description()
    prepared = prepare_videos(dataset, data_root, names, settings, extractor.patch_size)
    output = Path(output)
    record = output / "propagation.json"
    check_record(record, settings)

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    extractor = extractor.to(device).eval()
    output.mkdir(parents=True, exist_ok=True)
    for folder in [output, output / "visualize"] + [output / name for name in names if dataset == "jhmdb"]:
        remove_stale_temporaries(folder)
    if not record.exists():  # a resume keeps the first run's record (same protocol, checked above)
        write_json(record, settings)

    written, skipped = [], []
    for name, frames, extra, size in tqdm(prepared, desc=f"{dataset} videos", disable=not progress):
        final = output_path(dataset, output, name)
        if final.exists():
            skipped.append(name)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            propagate_video(dataset, extractor, frames, extra, size, final, settings, device, progress)
            written.append(name)
        strip = output / "visualize" / f"{name.replace('/', '__')}.png"
        if visualize and not strip.exists():
            visualize_video(dataset, frames, final, strip, extra, visualize_frames)
    return {"settings": settings, "written": written, "skipped": skipped}


# -----------------------------------------------------------------------------
# DIFT features (Tang et al., "Emergent Correspondence from Image Diffusion", Sec. 4.2, App. C)
# -----------------------------------------------------------------------------
#
# A diffusion UNet's up-block output, for the image's latent noised to a small timestep t
# with the model's own q(x_t | x_0), is a correspondence feature without any training. DIFT
# averages the FEATURES of an ensemble of noise draws (App. C: "a batch of random noise to
# get an averaged feature map ... 8 by default"). Two local sources, both diffusers folders:
#   an S-LDM folder (generate_views.py): context = the projection of a zero embedding, the
#       unconditional branch of its guidance (the image-conditioned model without an image);
#   a Stable Diffusion folder (unet/, vae/, scheduler/, text_encoder/, tokenizer/): context =
#       the empty prompt "" (App. C.3: "each image's prompt is a null prompt"); needs transformers.
# App. C.3 picks the block by resolution: for both of its models the temporal-correspondence
# feature map is "1/8 of the input" (DIFT_sd: n = 2, 640-d; DIFT_adm: n = 7 on DAVIS, n = 5 on
# JHMDB). An index means another stride in another UNet (a VQ-f4 four-level UNet, the S-LDM's
# shape, has strides 16, 8, 4, 4, so n = 2 would be stride 4), so the block is the first up-block
# whose output has DIFT's stride of 8 (SD: n = 2, the S-LDM: n = 1), or --dift-up-block.
# The other settings are the DIFT_sd rows' (t = 51 and the k-NN below), for both sources: the
# S-LDM is a latent diffusion model of SD's kind (docs/dift.md says why not ADM's rows). Input
# sizes: DIFT's own DAVIS reader (DINO's, short side 480, long side floored to a multiple of 32)
# on DAVIS's 854x480 frames gives 480x832; "smaller side 320" on JHMDB's 320x240 frames gives
# 320x416 by the same flooring. DIFT has no VIP setting: DAVIS's k-NN values with VIP's input
# size. Every value is overridden by an explicit flag.

DIFT_TIMESTEP = 51
DIFT_STRIDE = 8    # App. C.3: "feature map size is 1/8 of input", for SD and ADM, DAVIS and JHMDB
DIFT_ENSEMBLE = 8
DIFT_PROTOCOL = {
    "davis": dict(topk=15, queue_length=28, radius=15, temperature=0.2, input_size=(480, 832)),
    "vip": dict(topk=15, queue_length=28, radius=15, temperature=0.2, input_size=(880,)),
    "jhmdb": dict(topk=15, queue_length=14, radius=5, temperature=0.1, input_size=(320, 416)),
}


def vae_downsampling(vae):
    """Pixels per latent cell: the autoencoder halves the size once per encoder level but the last."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def up_block_stride(unet, vae, up_block):
    """Pixels per cell of up_blocks[up_block]'s output: the VAE's factor times 2 for each later
    up-block that still upsamples (SD: n = 0, 1, 2, 3 -> 32, 16, 8, 8; DIFT's eval_davis.py)."""
    later = sum(1 for block in unet.up_blocks[up_block + 1:] if getattr(block, "upsamplers", None))
    return vae_downsampling(vae) * 2 ** later


def dift_up_block(unet, vae, stride=DIFT_STRIDE):
    """The index n of the first up-block whose output has `stride` pixels per cell (SD: 32, 16, 8, 8
    -> n = 2; a VQ-f4 four-level S-LDM: 16, 8, 4, 4 -> n = 1). ValueError naming the strides if none has."""
    strides = [up_block_stride(unet, vae, n) for n in range(len(unet.up_blocks))]
    if stride not in strides:
        raise ValueError(f"no up-block of this UNet has DIFT's stride {stride} (up-block strides {strides}; "
                         f"choose one with --dift-up-block)")
    return strides.index(stride)


def image_latents(vae, images, posterior_noise):
    """images [B, 3, H, W] in [-1, 1], posterior_noise [E, B, C, h, w] -> x_0 [E, B, C, h, w],
    in the UNet's units (times vae.config.scaling_factor).

    AutoencoderKL: a posterior sample mean + std * noise per draw (DIFT encodes the image once per
    ensemble member with latent_dist.sample()). VQModel: the pre-quantisation latents, which LDM's
    first stage hands the UNet (generate_views.decode_latents quantises them on the way back)."""
    encoded = vae.encode(images.to(vae.dtype))
    if hasattr(encoded, "latent_dist"):
        dist = encoded.latent_dist
        x0 = dist.mean + dist.std * posterior_noise.to(dist.mean)
    else:
        x0 = encoded.latents.expand_as(posterior_noise)
    return x0 * vae.config.scaling_factor


def noised_latents(scheduler, x0, noise, timestep):
    """q(x_t | x_0) with the model's own schedule (DDPM Eq. 4, DIFT Sec. 4.2):
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, abar = scheduler.alphas_cumprod. [N, C, h, w]."""
    t = torch.full((x0.shape[0],), timestep, dtype=torch.long, device=x0.device)
    return scheduler.add_noise(x0, noise.to(x0), t)


class _UpBlockReached(Exception):
    """Raised by the forward hook to skip the UNet's remaining blocks once the feature is taken."""


def up_block_output(unet, x_t, timestep, context, up_block):
    """The output of unet.up_blocks[up_block] (after its upsampler, as DIFT's up_ft) for latents
    x_t [N, C, h, w] at `timestep` with cross-attention context [1, L, D] -> [N, C', h', w'].
    A forward hook records it; the later blocks are not run."""
    taken = {}

    def take(module, inputs, output):
        taken["features"] = output
        raise _UpBlockReached

    handle = unet.up_blocks[up_block].register_forward_hook(take)
    try:
        unet(x_t.to(unet.dtype), timestep, encoder_hidden_states=context.expand(len(x_t), -1, -1).to(unet.dtype))
    except _UpBlockReached:
        pass
    finally:
        handle.remove()
    return taken["features"].float()


class DiftFeatures(nn.Module):
    """DIFT as a feature extractor (see "Features"): frames [B, 3, H, W] (ImageNet-normalised,
    as load_frame gives) -> L2-normalised features [B, C, H/s, W/s]; `patch_size` is the
    stride s, `embed_dim` the width C, and `protocol` (DIFT_PROTOCOL) the defaults of the
    k-NN settings and input sizes.

    up_block None: the first up-block at DIFT's stride of 8 (`dift_up_block`). Each frame's
    noise is drawn from a generator seeded by (seed, the frame's pixels), so a frame's
    features depend neither on the batch nor on the order or resumption of a run."""

    protocol = DIFT_PROTOCOL

    def __init__(self, unet, vae, scheduler, context, *, timestep=DIFT_TIMESTEP, up_block=None,
                 ensemble_size=DIFT_ENSEMBLE, seed=0, source=None, folder=None):
        super().__init__()
        name = folder or "DiftFeatures"
        if up_block is None:
            try:
                up_block = dift_up_block(unet, vae)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if not 0 <= up_block < len(unet.up_blocks):
            raise ValueError(f"{name}: up-block {up_block} does not exist, the UNet has {len(unet.up_blocks)}")
        if not 0 <= timestep < len(scheduler.alphas_cumprod):
            raise ValueError(f"{name}: timestep {timestep} is outside the schedule's "
                             f"0..{len(scheduler.alphas_cumprod) - 1}")
        self.unet, self.vae, self.scheduler = unet.eval(), vae.eval(), scheduler
        self.register_buffer("context", context.detach(), persistent=False)
        self.timestep, self.up_block, self.ensemble_size, self.seed = timestep, up_block, ensemble_size, seed
        self.source, self.folder = source, folder
        self.patch_size = up_block_stride(unet, vae, up_block)
        self.embed_dim = list(reversed(unet.config.block_out_channels))[up_block]

    def description(self):
        return dict(features="dift", source=self.source, timestep=self.timestep, up_block=self.up_block,
                    ensemble_size=self.ensemble_size, seed=self.seed, stride=self.patch_size, channels=self.embed_dim)

    def draw_noise(self, image):
        """(posterior noise, diffusion noise), each [E, 1, C, h, w], for one frame [3, H, W]."""
        digest = hashlib.sha256(f"{self.seed}:".encode() + image.detach().float().cpu().numpy().tobytes()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))
        f = vae_downsampling(self.vae)
        shape = (self.ensemble_size, 1, self.unet.config.in_channels, image.shape[-2] // f, image.shape[-1] // f)
        return torch.randn(shape, generator=g), torch.randn(shape, generator=g)

    @torch.no_grad()
    def ensemble(self, image, posterior_noise, noise):
        """image [1, 3, H, W] in [-1, 1], noises [E, 1, C, h, w] -> the mean over the E draws of the
        up-block features [1, C', h', w'] (App. C: the features are averaged, not the inputs)."""
        x0 = image_latents(self.vae, image, posterior_noise).flatten(0, 1)          # [E, C, h, w]
        x_t = noised_latents(self.scheduler, x0, noise.flatten(0, 1), self.timestep)
        return up_block_output(self.unet, x_t, self.timestep, self.context, self.up_block).mean(0, keepdim=True)

    @torch.no_grad()
    def forward(self, frames):
        mean = frames.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = frames.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        images = (frames * std + mean) * 2 - 1  # DIFT's input: RGB in [-1, 1]
        features = [self.ensemble(image[None], *self.draw_noise(image)) for image in images]
        return F.normalize(torch.cat(features), dim=1)


def empty_prompt_embedding(folder, device="cpu"):
    """The text encoder's last hidden state of "" padded to the tokenizer's length, [1, 77, D], as
    StableDiffusionPipeline.encode_prompt computes a prompt's embedding."""
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise ImportError(f"{folder}: a Stable Diffusion folder's empty-prompt embedding needs the `transformers` "
                          f"package (pip install transformers)") from None
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").to(device).eval()
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(device))[0]


def load_dift(folder, *, timestep=DIFT_TIMESTEP, up_block=None, ensemble_size=DIFT_ENSEMBLE, seed=0,
              device="cpu"):
    """DiftFeatures from an S-LDM folder (generate_views.py's layout; unconditional context) or a
    Stable Diffusion folder in diffusers' layout (empty-prompt context). up_block None: the first
    up-block at DIFT's stride of 8."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VQModel

    folder = Path(folder)
    if (folder / "sldm.json").is_file():
        import generate_views
        sldm = generate_views.load_sldm(folder, device)
        with torch.no_grad():
            context = sldm.conditioner.unconditional()  # [1, 1, D]: the projection of a zero embedding
        unet, vae, scheduler, source = sldm.unet, sldm.vae, sldm.scheduler, "sldm"
    else:
        needed = ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                  "text_encoder/config.json", "tokenizer"]
        missing = [n for n in needed if not (folder / n).exists()]
        if missing:
            raise FileNotFoundError(f"{folder}: not a diffusion model folder, missing {missing} (an S-LDM folder "
                                    f"has sldm.json; a Stable Diffusion folder has {', '.join(needed)})")
        vae_class = json.loads((folder / "vae/config.json").read_text()).get("_class_name", "AutoencoderKL")
        vae_classes = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
        if vae_class not in vae_classes:
            raise ValueError(f"{folder}/vae/config.json: {vae_class!r} is not one of {sorted(vae_classes)}")
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).to(device)
        vae = vae_classes[vae_class].from_pretrained(folder / "vae", low_cpu_mem_usage=False).to(device)
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")  # as DIFT: only alphas_cumprod is used
        context, source = empty_prompt_embedding(folder, device), "stable-diffusion"
        for part, state in (("unet", unet.state_dict()), ("vae", vae.state_dict()),
                            ("text_encoder", {"the empty prompt's embedding": context})):
            check_finite(state, folder / part, "replace the model folder")
    for module in (unet, vae):
        module.requires_grad_(False)
    return DiftFeatures(unet, vae, scheduler, context, timestep=timestep, up_block=up_block,
                        ensemble_size=ensemble_size, seed=seed, source=source, folder=str(folder.resolve()))


# -----------------------------------------------------------------------------
# Your own video: a folder of frames or a video file, and a first-frame mask or keypoints
# -----------------------------------------------------------------------------
#
# The clip goes through propagate_video exactly as a benchmark video does: a mask as a
# one-video DAVIS (ids kept, palette PNGs at the frame size), keypoints as a one-video JHMDB
# (a Gaussian per joint, the top-5 decoding). Table 7's DAVIS / JHMDB values (or DIFT's)
# apply; the input size keeps the clip's aspect: long side 880, short side floored to
# --size-multiple. Written under OUTPUT:
#   frames/00000.jpg ...        a video file's decoded frames (JPEG, quality 95)
#   masks/<frame>.png           palette PNGs (mask), or
#   joint_positions.mat         pos_img [2, J, T], 1-based (JHMDB's format) and
#   keypoints.json              [T][J] [x, y] 0-based pixels, null = not visible (keypoints)
#   overlay.gif                 every frame with its mask or keypoints drawn (or .webp / .mp4)
#   propagation.json            the settings

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
OWN_VIDEO_INPUT_SIZE = (880,)
OVERLAY_FORMATS = ("gif", "webp", "mp4", "none")
DEFAULT_FPS = 12


def import_av(what):
    """PyAV, imported when a video file is read or written; `what` names that file in the error."""
    try:
        import av
    except ImportError:
        raise ImportError(f"{what}: video files need PyAV (pip install av==18.1.0); a folder of frames and a GIF "
                          f"overlay do not") from None
    return av


def video_frames(path):
    """A video file's frames as PIL RGB images, in order (PyAV, its first video stream). Frames come
    as stored: rotation metadata (phone videos) is not applied."""
    av = import_av(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            for frame in container.decode(video=0):
                yield frame.to_image()
    except av.FFmpegError as e:
        raise ValueError(f"{path}: cannot read the video ({e})") from None


def video_rate(path):
    """Frames per second of a video file's first video stream, or None when it does not say."""
    av = import_av(path)
    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else None


def decode_video(path, folder):
    """Write every frame of a video file to folder/00000.jpg, ... (the folder is replaced whole,
    renamed into place when complete). Returns the frame paths."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    count = 0
    for count, image in enumerate(video_frames(path), 1):
        image.save(tmp / f"{count - 1:05d}.jpg", quality=95)
    if count == 0:
        raise ValueError(f"{path}: the video has no frames")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return [folder / f"{t:05d}.jpg" for t in range(count)]


def first_frame_of(source):
    """(frame paths or None for a video file, the first frame's (width, height))."""
    source = Path(source)
    if source.is_dir():
        frames = list_files(source, FRAME_SUFFIXES)
        if not frames:
            raise FileNotFoundError(f"{source}: no {'/'.join(FRAME_SUFFIXES)} frames in this folder")
        check_frames(frames, ValueError)
        return frames, load_rgb(frames[0]).size
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such frame folder or video file")
    first = next(video_frames(source), None)
    if first is None:
        raise ValueError(f"{source}: the video has no frames")
    return None, first.size


def read_keypoints(path, width, height):
    """First-frame keypoints -> [J, 2] (x, y) 0-based pixels, NaN = not visible: a JSON list of
    [x, y] (null for a hidden joint), or a JHMDB joint_positions.mat (its first frame)."""
    path = Path(path)
    if path.suffix.lower() == ".mat":
        xy = ev.read_joints_mat(path, num_joints=None)[0]
    else:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: keypoints file not found") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a JSON keypoints file ({e})") from None
        pair = lambda p: isinstance(p, list) and len(p) == 2 and all(type(v) in (int, float) for v in p)  # noqa: E731
        if not isinstance(data, list) or not data or not all(p is None or pair(p) for p in data):
            raise ValueError(f"{path}: expected a JSON list of [x, y] pixel positions, null for a hidden joint")
        xy = np.array([[np.nan, np.nan] if p is None else p for p in data], dtype=np.float64)
    visible = np.isfinite(xy).all(1)
    outside = visible & ((xy[:, 0] < 0) | (xy[:, 0] > width - 1) | (xy[:, 1] < 0) | (xy[:, 1] > height - 1))
    if outside.any():
        j = int(np.argmax(outside))
        raise ValueError(f"{path}: keypoint {j} at ({xy[j, 0]:g}, {xy[j, 1]:g}) lies outside the "
                         f"{width}x{height} frame")
    if not visible.any():
        raise ValueError(f"{path}: no visible keypoint")
    return xy


def check_own_video(source, output, encoder, *, mask=None, keypoints=None, topk=None, queue_length=None,
                    radius=None, temperature=None, input_size=None, size_multiple=64, batch_size=8, num_heads=None):
    """Every check of propagate_own_video, before any long work: nothing would be overwritten, the
    clip is readable, the mask has the frame's size (or the keypoints lie in it), the encoder loads
    (encoder: as propagate_own_video's, or a function returning one, called after the cheaper
    checks) and the input size suits it. Returns the plan run_own_video carries out."""
    if (mask is None) == (keypoints is None):
        raise ValueError("give exactly one of a first-frame mask and first-frame keypoints")
    output = Path(output)
    check_output_folder(output)
    final = output / ("masks" if mask is not None else "joint_positions.mat")
    if final.exists():
        raise FileExistsError(f"{final}: already exists (choose another output folder)")
    frames, (width, height) = first_frame_of(source)
    if mask is not None:
        ids = ev.read_label_png(mask)
        if ids.shape != (height, width):
            raise ValueError(f"{mask}: mask is {ids.shape[1]}x{ids.shape[0]} but the frames of {source} are "
                             f"{width}x{height} (draw it on the first frame at full size)")
        if not ids.any():
            raise ValueError(f"{mask}: the mask has no object (every id is 0, the background)")
        extra = [Path(mask)]
    else:
        extra = [read_keypoints(keypoints, width, height)]
    if callable(encoder) and not isinstance(encoder, nn.Module):  # a loader, run after the cheap checks
        encoder = encoder()
    checkpoint = str(Path(encoder).resolve()) if isinstance(encoder, (str, Path)) else getattr(encoder, "folder", None)
    if isinstance(encoder, (str, Path)):
        encoder, _ = load_checkpoint_encoder(encoder, num_heads)
    kind = "davis" if mask is not None else "jhmdb"  # the benchmark whose protocol the clip follows
    defaults = {**getattr(encoder, "protocol", PROTOCOL)[kind], "input_size": OWN_VIDEO_INPUT_SIZE}
    extractor = feature_extractor(encoder)
    given = dict(topk=topk, queue_length=queue_length, radius=radius, temperature=temperature, input_size=input_size)
    settings = {k: defaults[k] if v is None else v for k, v in given.items()}
    first = mask if mask is not None else keypoints
    settings.update(video=str(Path(source).resolve()), first=str(Path(first).resolve()), checkpoint=checkpoint,
                    input_size=list(settings["input_size"]), size_multiple=size_multiple, batch_size=batch_size,
                    encoder=extractor.description())
    size = input_size_for(height, width, settings["input_size"], size_multiple)
    if min(size) <= 0 or size[0] % extractor.patch_size or size[1] % extractor.patch_size:
        raise ValueError(f"{source}: input size {size} (from frame {width}x{height} and input size "
                         f"{settings['input_size']}) is not a positive multiple of the patch size "
                         f"{extractor.patch_size}")
    return dict(source=Path(source), output=output, frames=frames, extra=extra, kind=kind, final=final,
                size=size, extractor=extractor, settings=settings)


def overlay_frames(frames, kind, final, height):
    """Each frame with its propagated mask (kind "davis": final is the PNG folder) or keypoints
    (kind "jhmdb": final is the .mat) drawn on it, `height` pixels high."""
    joints = ev.read_joints_mat(final, num_joints=None) if kind == "jhmdb" else None
    for t, path in enumerate(frames):
        panel, scale = _panel(path, height)
        if joints is not None:
            yield draw_joints(panel, joints[t], scale)
        else:
            yield draw_mask(panel, ev.read_label_png(Path(final) / f"{Path(path).stem}.png"))


def save_animation(path, images, fps):
    """Frames (PIL images) -> an animated GIF or WebP (Pillow) or an H.264 MP4 (PyAV, cropped to
    even sizes as yuv420p needs), written atomically. fps: frames per second."""
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind == "mp4":
        av = import_av(path)

        def write(tmp):
            with av.open(str(tmp), "w", format="mp4") as container:
                stream = None
                for image in images:
                    if stream is None:
                        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                        stream.width, stream.height = image.width // 2 * 2, image.height // 2 * 2
                        stream.pix_fmt = "yuv420p"
                    frame = av.VideoFrame.from_image(image.crop((0, 0, stream.width, stream.height)))
                    container.mux(stream.encode(frame))
                container.mux(stream.encode())
    else:
        first, *rest = list(images)
        write = lambda tmp: first.save(tmp, format=kind.upper(), save_all=True, append_images=rest,  # noqa: E731
                                       duration=max(1, round(1000 / fps)), loop=0)
    atomic_write(path, write)


def run_own_video(plan, device=None, overlay="gif", overlay_height=480, fps=None, progress=True):
    """Carry out a check_own_video plan: decode a video file, propagate, write the predictions,
    the keypoints JSON and the overlay. Returns {"frames", "predictions", "overlay"}."""
    output, final, kind = plan["output"], plan["final"], plan["kind"]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "propagation.json", plan["settings"])
    frames = plan["frames"] or decode_video(plan["source"], output / "frames")
    extractor = plan["extractor"].to(device).eval()
    propagate_video(kind, extractor, frames, plan["extra"], plan["size"], final, plan["settings"], device, progress)
    if kind == "jhmdb":
        xy = ev.read_joints_mat(final, num_joints=None)
        rows = [[None if np.isnan(p).any() else [round(float(v), 2) for v in p] for p in frame] for frame in xy]
        atomic_write(output / "keypoints.json", lambda tmp: tmp.write_text(json.dumps(rows) + "\n"))
    animation = None
    if overlay != "none":
        if fps is None:
            fps = (video_rate(plan["source"]) if plan["frames"] is None else None) or DEFAULT_FPS
        animation = output / f"overlay.{overlay}"
        with Image.open(frames[0]) as im:
            height = min(overlay_height, im.height)
        save_animation(animation, overlay_frames(frames, kind, final, height), fps)
    return {"frames": frames, "predictions": final, "overlay": animation}


def propagate_own_video(source, output, encoder, *, mask=None, keypoints=None, device=None, overlay="gif",
                        overlay_height=480, fps=None, progress=True, **protocol):
    """Propagate a first-frame mask (palette or grayscale id PNG at the frame size, 0 = background)
    or keypoints (read_keypoints) through a folder of frames or a video file, and write the
    per-frame predictions and an overlay under `output` (see the layout above).

    encoder: a ViT checkpoint path (CDG-MAE, MAE, CropMAE, DINO), a VisionTransformer or
    DiftFeatures. protocol: topk, queue_length, radius, temperature, input_size, size_multiple,
    batch_size, num_heads (None: Table 7's DAVIS / JHMDB values, or DIFT_PROTOCOL's)."""
    plan = check_own_video(source, output, encoder, mask=mask, keypoints=keypoints, **protocol)
    return run_own_video(plan, device, overlay, overlay_height, fps, progress)


# -----------------------------------------------------------------------------
# Records and checks: propagation.json, the checkpoint's fingerprint, the videos
# -----------------------------------------------------------------------------

# Settings that change the predictions: a rerun into a folder made with others is refused.
PROTOCOL_KEYS = ("dataset", "checkpoint_sha256", "encoder", "topk", "queue_length", "radius", "temperature",
                 "input_size", "size_multiple", "resolution")


def checkpoint_sha256(path):
    """Hex sha256 of a checkpoint file; a missing path or a folder is one line naming it."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: checkpoint not found (check --checkpoint)")
    if Path(path).is_dir():
        raise InputError(f"{path}: is a folder, not a checkpoint file (check --checkpoint)")
    return file_sha256(path)


def weights_sha256(module):
    """Hex sha256 of a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)  # a 0-d tensor cannot be viewed as bytes
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint_encoder(checkpoint, num_heads=None):
    """(encoder, sha256 of the file): a checkpoint that cannot be read, is a folder, is no ViT,
    holds non-finite weights or does not split into --num-heads heads raises InputError /
    FileNotFoundError naming it, on one line."""
    if any((Path(checkpoint) / name).exists() for name in DIFFUSION_FOLDER_FILES):
        raise InputError(f"{checkpoint}: a diffusion model folder, not a ViT checkpoint file (give a ViT .pth, "
                            f"or pass --features dift to propagate its DIFT features)")
    fingerprint = checkpoint_sha256(checkpoint)
    try:
        return load_encoder(checkpoint, num_heads), fingerprint
    except InputError:  # its message says what to do
        raise
    except (RuntimeError, ValueError) as e:  # cdgmae: "path: cannot read checkpoint (...)", bad layout
        text = one_line(e)
        text = text if len(text) <= 240 else text[:237] + "..."
        raise InputError(f"{text} (give a CDG-MAE, MAE, CropMAE or DINO ViT checkpoint)") from None


def check_settings(settings):
    """Range checks of the protocol settings (the command line checks them when parsing)."""
    rules = [("topk", settings["topk"] >= 1, ">= 1"), ("queue_length", settings["queue_length"] >= 0, ">= 0"),
             ("radius", settings["radius"] > 0, "> 0"),
             ("temperature", settings["temperature"] >= MIN_TEMPERATURE, f">= {MIN_TEMPERATURE:.3g} (float32's smallest "
              "normal number: a lower one overflows the scores)"),
             ("input_size", len(settings["input_size"]) in (1, 2) and min(settings["input_size"]) >= 1,
              "(height, width) or (long side,), each >= 1"),
             ("size_multiple", settings["size_multiple"] >= 1, ">= 1"), ("batch_size", settings["batch_size"] >= 1, ">= 1")]
    for key, ok, rule in rules:
        if not ok:
            raise InputError(f"--{key.replace('_', '-')} {settings[key]}: must be {rule}")


def check_record(record, settings):
    """Refuse (InputError, one line) an output folder whose propagation.json records settings
    that differ from `settings` in a key of PROTOCOL_KEYS."""
    if record.exists():
        refuse_other_settings(record, read_record(record, "use another --output"), settings, PROTOCOL_KEYS,
                              made="predictions in this folder were made",
                              what_to_do="use another --output, or the same settings to resume")


def prepare_videos(dataset, data_root, videos, settings, patch_size):
    """Check every video before any long work and return [(name, frames, annotation paths or
    joints, input (H, W))]: its files exist and are valid (evaluate.check_segmentation_video:
    frames readable and of one size, annotations 'P' / 'L' PNGs of their frame's size, first
    ids 0..K (DAVIS) or classes 0..19 (VIP); JHMDB: pos_img 2x15xT with T = frames), its frames
    are images load_frame takes (`check_frames`), its input size is a positive multiple of the
    patch size and --topk does not exceed the context keys."""
    prepared = []
    for name in videos:
        if dataset == "jhmdb":
            frames, _, extra = ev.jhmdb_video(data_root, name)
            width, height = ev.frame_size(frames)
        else:
            if dataset == "davis":
                frames, extra = ev.davis_video(data_root, name, settings["resolution"])
            else:
                frames, extra = ev.vip_video(data_root, name)
            _, _, (width, height) = ev.check_segmentation_video(dataset, frames, extra)
        check_frames(frames)
        size = input_size_for(height, width, settings["input_size"], settings["size_multiple"])
        if min(size) <= 0 or size[0] % patch_size or size[1] % patch_size:
            flags = f"--input-size {' '.join(map(str, settings['input_size']))}" + (
                f" and --size-multiple {settings['size_multiple']}" if len(settings["input_size"]) == 1 else "")
            raise InputError(f"{frames[0]}: input size {size} (from frame {width}x{height} and {flags}) is not a "
                                f"positive multiple of the patch size {patch_size} (choose multiples of {patch_size})")
        keys = (1 + settings["queue_length"]) * (size[0] // patch_size) * (size[1] // patch_size)
        if settings["topk"] > keys:
            raise InputError(f"--topk {settings['topk']}: more than the {keys} context keys of {frames[0].parent} "
                                f"(lower --topk or raise --queue-length / --input-size)")
        prepared.append((name, frames, extra, size))
    return prepared


def check_frames(frames, error=InputError):
    """Every frame is an image that load_frame takes (common.check_image: a mode with a
    conversion to RGB, at most Image.MAX_IMAGE_PIXELS pixels), else `error` naming it."""
    for frame in frames:
        try:
            check_image(frame)
        except UnreadableImage as e:
            raise error(str(e)) from None


# -----------------------------------------------------------------------------
# Visualisation: PNG strips of a few frames with the propagated labels drawn on them
# -----------------------------------------------------------------------------

def _panel(frame_path, height):
    image = load_rgb(frame_path)
    scale = height / image.height
    return image.resize((max(1, round(image.width * scale)), height), Image.BILINEAR), scale


def draw_mask(image, ids, alpha=0.55):
    """Blend the palette colour of each non-zero id over `image` and outline each region."""
    ids = np.array(Image.fromarray(ids).resize(image.size, Image.NEAREST))
    rgb = np.asarray(image, dtype=np.float32)
    colours = ev.davis_palette()[ids].astype(np.float32)
    out = np.where(ids[..., None] > 0, (1 - alpha) * rgb + alpha * colours, rgb)
    edge = ev.boundary_map(ids > 0) | (np.diff(ids, axis=1, prepend=ids[:, :1]) != 0) | \
        (np.diff(ids, axis=0, prepend=ids[:1]) != 0)
    out[edge] = 255
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


# JHMDB limbs (0-based joint indices, evaluate.JHMDB_JOINTS order) and their colours.
SKELETON = [(0, 1), (0, 2), (0, 3), (0, 4), (3, 7), (7, 11), (4, 8), (8, 12),
            (1, 5), (5, 9), (9, 13), (1, 6), (6, 10), (10, 14)]
LIMB_COLOURS = [(255, 220, 0), (255, 220, 0), (255, 80, 60), (60, 160, 255), (255, 80, 60), (255, 160, 40),
                (60, 160, 255), (60, 230, 255), (255, 80, 60), (255, 160, 40), (255, 160, 40), (60, 160, 255),
                (60, 230, 255), (60, 230, 255)]  # torso yellow, right side red/orange, left side blue/cyan


def draw_joints(image, xy, scale):
    """Draw limbs and joints (pixel coordinates of the original frame, NaN = not visible)."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    xy = np.asarray(xy, dtype=np.float64) * scale
    r = max(2, image.height // 64)
    for (a, b), colour in zip(SKELETON if len(xy) == len(ev.JHMDB_JOINTS) else [], LIMB_COLOURS):
        if np.isfinite(xy[[a, b]]).all():
            draw.line([tuple(xy[a]), tuple(xy[b])], fill=colour, width=r + 1)
    for x, y in xy:
        if np.isfinite(x) and np.isfinite(y):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255), outline=(0, 0, 0))
    return image


def save_strip(path, rows, gap=4, caption=14):
    """rows: [(title, [(t, panel image), ...]), ...] -> one PNG, a row per title, each panel
    captioned with its frame index."""
    width = max(sum(p.width for _, p in panels) + gap * (len(panels) - 1) for _, panels in rows)
    height = sum(max(p.height for _, p in panels) + caption for _, panels in rows)
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    y = 0
    for title, panels in rows:
        x = 0
        for t, panel in panels:
            strip.paste(panel, (x, y + caption))
            draw.text((x + 2, y + 1), f"{title} t={t}", fill=(0, 0, 0))
            x += panel.width + gap
        y += max(p.height for _, p in panels) + caption
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: strip.save(tmp, format="PNG"))


def visualize_video(dataset, frames, prediction, path, ground_truth=None, num_panels=6, panel_height=192):
    """A strip of `num_panels` evenly spaced frames with the predictions read back from disk
    (DAVIS / VIP: the folder of PNGs; JHMDB: the joint_positions.mat) and, below, the ground
    truth (annotation paths, None where absent, or JHMDB joints [T, 15, 2])."""
    picks = sorted(set(np.linspace(0, len(frames) - 1, min(num_panels, len(frames))).round().astype(int)))
    joints = ev.read_joints_mat(prediction) if dataset == "jhmdb" else None
    predicted, truth = [], []
    for t in picks:
        panel, scale = _panel(frames[t], panel_height)
        if dataset == "jhmdb":
            predicted.append((t, draw_joints(panel, joints[t], scale)))
            if ground_truth is not None and t < len(ground_truth):
                truth.append((t, draw_joints(panel, ground_truth[t], scale)))
        else:
            predicted.append((t, draw_mask(panel, ev.read_label_png(Path(prediction) / f"{Path(frames[t]).stem}.png"))))
            if ground_truth is not None and ground_truth[t] is not None:
                truth.append((t, draw_mask(panel, ev.read_label_png(ground_truth[t]))))
    save_strip(path, [("prediction", predicted)] + ([("ground truth", truth)] if truth else []))


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ev.add_dataset_arguments(p, required=False)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="encoder checkpoint: CDG-MAE (cdgmae.py), MAE, CropMAE or DINO (plain backbone or "
                        "training checkpoint with 'teacher'); with --features dift, a diffusion model folder "
                        "(an S-LDM folder of generate_views.py, or a Stable Diffusion folder in diffusers' layout)")
    p.add_argument("--output", required=True, type=Path,
                   help="prediction folder: DAVIS <seq>/<frame>.png (palette), VIP <video>/<frame>.png "
                        "(class ids), JHMDB <class>/<video>/joint_positions.mat; visualize/ holds the strips")
    g = p.add_argument_group("protocol (default: the dataset's value)")
    g.add_argument("--topk", type=checked(int, 1), default=None,
                   help="neighbours whose labels are averaged, >= 1 (7 / 10 / 7)")
    g.add_argument("--queue-length", type=checked(int, 0), default=None,
                   help="previous frames in the context, >= 0 (0: frame 0 only) (20)")
    g.add_argument("--radius", type=checked(float, 0, low_open=True), default=None,
                   help="queue keys must lie strictly within this many feature cells of the query, > 0 (20)")
    g.add_argument("--temperature", type=checked(float, MIN_TEMPERATURE), default=None,
                   help=f"softmax temperature over the top-k, >= {MIN_TEMPERATURE:.3g}: float32's smallest normal "
                        "number (0.7)")
    g.add_argument("--input-size", type=checked(int, 1), nargs="+", default=None,
                   help="H W, or one number L: long side L, short side scaled and floored to --size-multiple; "
                        "multiples of the patch size (480 880 / 880 / 320 320)")
    g.add_argument("--size-multiple", type=checked(int, 1), default=64,
                   help="short-side rounding for a one-number --input-size (a multiple of the patch size)")
    g = p.add_argument_group("encoder and machine")
    g.add_argument("--num-heads", type=checked(int, 1), default=None,
                   help="attention heads (default: the checkpoint's args, else width / 64)")
    g.add_argument("--batch-size", type=checked(int, 1), default=8, help="frames per feature-extraction batch")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument("--threads", type=checked(int, 1, os.cpu_count() or 1), default=None,
                   help="torch CPU threads, at most the CPUs here (default: torch's)")
    g = p.add_argument_group("extras")
    g.add_argument("--visualize", action=argparse.BooleanOptionalAction, default=False,
                   help="write output/visualize/<video>.png: frames with the propagated masks or joints")
    g.add_argument("--visualize-frames", type=checked(int, 1), default=6, help="frames per strip")
    g.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=False,
                   help="score the predictions with evaluate.py afterwards")
    add_dift_arguments(p)
    add_own_video_arguments(p)
    return p


def add_dift_arguments(p):
    g = p.add_argument_group("DIFT features (App. C.3 presets, each overridden by its flag: DAVIS top-k 15, queue 28, "
                             "radius 15, temperature 0.2, input 480 832; JHMDB 15, 14, 5, 0.1, 320 416)")
    g.add_argument("--features", choices=("vit", "dift"), default="vit",
                   help="vit: the ViT of --checkpoint; dift: the up-block features of the diffusion model folder "
                        "--checkpoint, with DIFT's settings as the protocol's defaults")
    g.add_argument("--dift-timestep", type=checked(int, 0), default=DIFT_TIMESTEP, help="t of q(x_t | x_0)")
    g.add_argument("--dift-up-block", type=checked(int, 0), default=None,
                   help="index n (from 0) of the UNet up-block whose output is the feature; unset: the first "
                        "up-block at DIFT's stride of 8, '1/8 of the input' (Stable Diffusion: n = 2; a VQ-f4 "
                        "four-level S-LDM: n = 1); propagation.json records the block, stride and channels")
    g.add_argument("--dift-ensemble", type=checked(int, 1), default=DIFT_ENSEMBLE,
                   help="noise draws whose features are averaged per frame")
    g.add_argument("--dift-seed", type=checked(int, 0), default=0, help="seed of the noise draws, >= 0")


def add_own_video_arguments(p):
    g = p.add_argument_group("your own video (instead of --dataset and --data-root; Table 7's DAVIS values for a "
                             "mask, JHMDB's for keypoints, input long side 880)")
    g.add_argument("--video", type=Path, default=None,
                   help="a folder of frames (.jpg / .png, natural order: 2 before 10) or a video file (needs PyAV)")
    g.add_argument("--first-mask", type=Path, default=None,
                   help="the first frame's mask: palette or grayscale PNG of object ids at the frame's size, "
                        "0 = background")
    g.add_argument("--first-keypoints", type=Path, default=None,
                   help="the first frame's keypoints: a JSON list of [x, y] (0-based pixels, null = hidden), "
                        "or a JHMDB joint_positions.mat")
    g.add_argument("--overlay", choices=OVERLAY_FORMATS, default="gif",
                   help="output/overlay.<format>: every frame with its mask or keypoints (mp4 needs PyAV)")
    g.add_argument("--overlay-height", type=checked(int, 16), default=480,
                   help="overlay height in pixels (at most the frame's)")
    g.add_argument("--fps", type=checked(float, 0, low_open=True), default=None,
                   help=f"overlay frames per second (default: the video's, else {DEFAULT_FPS})")


def encoder_from_args(args):
    """--checkpoint as given (a ViT checkpoint, loaded later) or, with --features dift, DiftFeatures
    of the model folder; a folder that does not load ends the command with one line."""
    if args.features == "vit":
        return args.checkpoint
    try:
        return load_dift(args.checkpoint, timestep=args.dift_timestep, up_block=args.dift_up_block,
                         ensemble_size=args.dift_ensemble, seed=args.dift_seed)
    except (OSError, ValueError, ImportError) as e:
        message = str(e)
        raise SystemExit(message if message.startswith(str(args.checkpoint)) else f"{args.checkpoint}: {message}")


def own_video_main(args, parser):
    if args.dataset is not None or args.data_root is not None:
        parser.error("--video replaces --dataset and --data-root: give one or the other")
    if (args.first_mask is None) == (args.first_keypoints is None):
        parser.error("--video needs exactly one of --first-mask and --first-keypoints")
    try:
        if args.overlay == "mp4":
            import_av("--overlay mp4")
        plan = check_own_video(args.video, args.output, lambda: encoder_from_args(args), mask=args.first_mask,
                               keypoints=args.first_keypoints, topk=args.topk, queue_length=args.queue_length,
                               radius=args.radius, temperature=args.temperature, input_size=args.input_size,
                               size_multiple=args.size_multiple, batch_size=args.batch_size, num_heads=args.num_heads)
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(one_line(e)) from None
    try:
        result = run_own_video(plan, args.device, args.overlay, args.overlay_height, args.fps)
    except OSError as e:  # a full disk, a folder made read-only meanwhile: finished files stay whole
        if e.errno not in EXPECTED_OS_ERRORS:
            raise
        raise SystemExit(one_line(e)) from None
    print(f"{len(result['frames'])} frames propagated -> {result['predictions']}"
          + (f", overlay {result['overlay']}" if result["overlay"] else ""))
    return result


def main(argv=None):
    """Propagate (and with --evaluate score). An expected failure (bad flag, bad or missing file,
    unreadable checkpoint, settings that differ from the output folder's, full disk) exits
    with one line `path: what is wrong (what to do)` before any work where it can be found
    before, and never with a traceback."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.input_size is not None and len(args.input_size) not in (1, 2):
        parser.error(f"argument --input-size: give H W or one long side, not {len(args.input_size)} numbers")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.video is not None:
        return own_video_main(args, parser)
    if args.dataset is None or args.data_root is None:
        parser.error("--dataset and --data-root are required (or --video for your own clip)")
    if args.first_mask is not None or args.first_keypoints is not None:
        parser.error("--first-mask and --first-keypoints go with --video")
    with exit_on_expected_errors():
        result = propagate_dataset(
            args.dataset, args.data_root, encoder_from_args(args), args.output, topk=args.topk,
            queue_length=args.queue_length, radius=args.radius, temperature=args.temperature,
            input_size=args.input_size, size_multiple=args.size_multiple, list_file=args.list_file,
            videos=args.videos, subset=args.subset, resolution=args.resolution, batch_size=args.batch_size,
            device=args.device, num_heads=args.num_heads,
            visualize=args.visualize, visualize_frames=args.visualize_frames)
    print(f"{len(result['written'])} videos propagated, {len(result['skipped'])} already done -> {args.output}")
    if args.evaluate:  # --flag=value: a path or name that starts with "-" stays a value
        ev.main([f"--dataset={args.dataset}", f"--data-root={args.data_root}", f"--predictions={args.output}",
                 f"--subset={args.subset}", f"--resolution={args.resolution}"]
                + ([f"--list={args.list_file}"] if args.list_file else [])
                + (["--videos", *args.videos] if args.videos else []))
    return result


if __name__ == "__main__":
    run_command(main)
