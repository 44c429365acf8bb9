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
  Labels    DAVIS / VIP: the first annotation is resized to the input size by nearest
            neighbour (OpenCV's INTER_NEAREST: source index floor(x * (1 / (out / in))) in
            double precision), DAVIS void (255) set to background (as the official
            scorer counts it; a propagated 255 would stop that scorer), split into one
            channel per id present in it (background included), and each channel
            is resized to the feature grid bilinearly (no antialiasing), so labels are soft.
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
            those k; the prediction is the weighted sum of their soft labels.
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

Usage:
    python propagate.py --dataset davis --data-root DAVIS --checkpoint ckpt.pth --output runs/davis
    python propagate.py --dataset vip --data-root VIP_Fine --checkpoint ckpt.pth --output runs/vip --visualize
    python propagate.py --dataset jhmdb --data-root JHMDB --checkpoint dino_deitsmall16_pretrain.pth
        --output runs/jhmdb --list jhmdb_vallist.txt --evaluate          (one command)

Import:
    from propagate import label_propagation, load_encoder, propagate_dataset
    labels = label_propagation(features, first_labels, topk=7, queue_length=20, radius=20, temperature=0.7)
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import evaluate as ev
from cdgmae import _process_alive, checked, encoder_from_checkpoint, image_to_tensor, load_rgb, remove_stale_temporaries

# Table 7 and CropMAE's input sizes. input_size: (height, width), or (long side,).
PROTOCOL = {
    "davis": dict(topk=7, queue_length=20, radius=20, temperature=0.7, input_size=(480, 880)),
    "vip": dict(topk=10, queue_length=20, radius=20, temperature=0.7, input_size=(880,)),
    "jhmdb": dict(topk=7, queue_length=20, radius=20, temperature=0.7, input_size=(320, 320)),
}
JHMDB_SIGMA = 0.5        # Gaussian width of a joint on the feature grid, in cells
JHMDB_DECODE_TOPK = 5    # cells averaged to read a joint's position back
# JHMDB limbs (0-based joint indices, evaluate.JHMDB_JOINTS order), for drawing only.
SKELETON = [(0, 1), (0, 2), (0, 3), (0, 4), (3, 7), (7, 11), (4, 8), (8, 12),
            (1, 5), (5, 9), (9, 13), (1, 6), (6, 10), (10, 14)]


# -----------------------------------------------------------------------------
# Encoder and features
# -----------------------------------------------------------------------------

def load_encoder(checkpoint, num_heads=None):
    """A VisionTransformer loaded strictly from a checkpoint of CDG-MAE, MAE, CropMAE or DINO
    (cdgmae.encoder_from_checkpoint: layouts, heads). Its stored position-embedding grid is
    kept, so the only resize is the one to each frame's grid."""
    return encoder_from_checkpoint(checkpoint, num_heads=num_heads).eval()


@torch.no_grad()
def extract_features(encoder, frames):
    """frames [B, 3, H, W] (normalised) -> L2-normalised patch features [B, C, H/P, W/P] of the
    last block after the final norm, cls token dropped. The ViT resizes its position
    embedding to the frame's grid as CropMAE's evaluation does (cdgmae.interpolate_pos_embed)."""
    B, _, H, W = frames.shape
    P = encoder.patch_size
    tokens = encoder.forward_features(frames)
    features = tokens[:, 1:].reshape(B, H // P, W // P, -1).permute(0, 3, 1, 2)
    return F.normalize(features, dim=1)


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
def label_propagation(features, first_labels, *, topk, queue_length, radius, temperature,
                      max_chunk_bytes=2 ** 28, on_frame=None):
    """Propagate frame 0's soft labels through a video.

    features [T, C, h, w] (L2-normalised over C), first_labels [K, h, w]
    -> soft labels [T, K, h, w]; frame 0 is first_labels itself.

    Frame t (>= 1) reads the context frames [0] + the queue_length previous ones (frame 0
    repeated before the start). Each query cell scores every context key by dot product;
    keys of the queue frames (not of the long-term frame 0) at distance >= radius are
    excluded; scores are divided by the temperature; the top-k over all context keys
    together are softmaxed and their labels averaged with those weights.

    Implementation (same result, less work): a frame repeated in the context (frame 0 early
    in the video) is multiplied with the queries once and copied; the temperature is applied
    to the k selected scores only (dividing by it does not change the order); queries are
    processed in chunks of at most max_chunk_bytes of affinities, in reused buffers.
    `on_frame(t)` is called after each frame (progress bars).
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
    except RuntimeError as e:  # cdgmae.load_rgb: "path: cannot decode image (...)"
        raise ev.InputError(f"{ev.one_line(e)} (replace the frame; finished videos are kept)") from None
    x = image_to_tensor(image)
    if tuple(x.shape[-2:]) != tuple(size):
        # Bilinear is affine per channel, so normalising first changes nothing.
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]
    return x


def video_features(encoder, frames, size, batch_size=8, device="cpu", on_frame=None):
    """Features [T, C, H/P, W/P] of a list of frame paths, extracted batch by batch."""
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
        chunks.append(extract_features(encoder, torch.stack(batch).to(device)))
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


LIMB_COLOURS = [(255, 220, 0), (255, 220, 0), (255, 80, 60), (60, 160, 255), (255, 80, 60), (255, 160, 40),
                (60, 160, 255), (60, 230, 255), (255, 80, 60), (255, 160, 40), (255, 160, 40), (60, 160, 255),
                (60, 230, 255), (60, 230, 255)]  # torso yellow, right side red/orange, left side blue/cyan


def draw_joints(image, xy, scale):
    """Draw limbs and joints (pixel coordinates of the original frame, NaN = not visible)."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    xy = np.asarray(xy, dtype=np.float64) * scale
    r = max(2, image.height // 64)
    for (a, b), colour in zip(SKELETON, LIMB_COLOURS):
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
    ev.atomic_save(path, lambda tmp: strip.save(tmp, format="PNG"))


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
# Datasets
# -----------------------------------------------------------------------------

def prepare_videos(dataset, data_root, videos, settings, patch_size):
    """Check every video before any long work and return [(name, frames, annotation paths or
    joints, input (H, W))]: its files exist and are valid (evaluate.check_segmentation_video:
    frames readable and of one size, annotations 'P' / 'L' PNGs of their frame's size, first
    ids 0..K (DAVIS) or classes 0..19 (VIP); JHMDB: pos_img 2x15xT with T = frames), its input
    size is a positive multiple of the patch size and --topk does not exceed the context keys."""
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
        size = input_size_for(height, width, settings["input_size"], settings["size_multiple"])
        if min(size) <= 0 or size[0] % patch_size or size[1] % patch_size:
            flags = f"--input-size {' '.join(map(str, settings['input_size']))}" + (
                f" and --size-multiple {settings['size_multiple']}" if len(settings["input_size"]) == 1 else "")
            raise ev.InputError(f"{frames[0]}: input size {size} (from frame {width}x{height} and {flags}) is not a "
                                f"positive multiple of the patch size {patch_size} (choose multiples of {patch_size})")
        keys = (1 + settings["queue_length"]) * (size[0] // patch_size) * (size[1] // patch_size)
        if settings["topk"] > keys:
            raise ev.InputError(f"--topk {settings['topk']}: more than the {keys} context keys of {frames[0].parent} "
                                f"(lower --topk or raise --queue-length / --input-size)")
        prepared.append((name, frames, extra, size))
    return prepared


def output_path(dataset, output, name):
    """Where a finished video's predictions live (its existence marks the video as done)."""
    if dataset == "jhmdb":
        return Path(output) / name / "joint_positions.mat"
    return Path(output) / name


@torch.no_grad()
def propagate_video(dataset, encoder, frames, extra, size, final, settings, device, progress=True):
    """Propagate one video and write its predictions atomically to `final` (a folder of PNGs,
    renamed into place when complete, or a .mat file)."""
    P = encoder.patch_size
    grid = (size[0] // P, size[1] // P)
    T = len(frames)
    bar = tqdm(total=3 * T, desc=final.name if dataset != "jhmdb" else final.parent.name, leave=False,
               disable=not progress)
    try:
        features = video_features(encoder, frames, size, settings["batch_size"], device, on_frame=bar.update)
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
        soft = label_propagation(features, first.to(device), topk=settings["topk"],
                                 queue_length=settings["queue_length"], radius=settings["radius"],
                                 temperature=settings["temperature"], on_frame=lambda t: bar.update(1))
        if dataset == "jhmdb":
            xy = np.stack([decode_joints(s) for s in soft]) * np.array([width / grid[1], height / grid[0]])
            ev.write_joints_mat(final, xy)
            bar.update(T)
            return
        tmp = partial_path(final)
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


PARTIAL_NAME = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.partial$")
LEGACY_TEMPORARY = re.compile(r"^\..+\.tmp(?P<pid>\d+)$")  # evaluate.atomic_save's names before host-pid


def partial_path(final):
    """The hidden folder a video's PNGs are written in before it is renamed to `final`:
    ".<video>.<host>-<pid>.partial", unique per process like cdgmae.temporary_path."""
    return final.with_name(f".{final.name}.{socket.gethostname()}-{os.getpid()}.partial")


def remove_stale_writes(folder):
    """Remove what killed writers on this host left in `folder`: temporaries
    (cdgmae.remove_stale_temporaries), partial video folders (partial_path) and the
    ".<name>.tmp<pid>" files of earlier versions. Live writers' files are kept."""
    host = socket.gethostname()
    for entry in os.scandir(folder) if os.path.isdir(folder) else ():
        partial, legacy = PARTIAL_NAME.match(entry.name), LEGACY_TEMPORARY.match(entry.name)
        if partial and partial["host"] == host and not _process_alive(int(partial["pid"])):
            shutil.rmtree(entry.path, ignore_errors=True)
        elif legacy and entry.is_file() and not _process_alive(int(legacy["pid"])):
            os.unlink(entry.path)
    remove_stale_temporaries(folder)


# Settings that change the predictions: a rerun into a folder made with others is refused.
PROTOCOL_KEYS = ("dataset", "checkpoint_sha256", "encoder", "topk", "queue_length", "radius", "temperature",
                 "input_size", "size_multiple", "resolution")


def file_sha256(path, chunk=1 << 20):
    """Hex sha256 of a file's contents, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while (block := f.read(chunk)):
                digest.update(block)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint not found (check --checkpoint)") from None
    except IsADirectoryError:
        raise ev.InputError(f"{path}: is a folder, not a checkpoint file (check --checkpoint)") from None
    return digest.hexdigest()


def weights_sha256(module):
    """Hex sha256 of a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)  # a 0-d tensor cannot be viewed as bytes
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint_encoder(checkpoint, num_heads=None):
    """(encoder, sha256 of the file): a checkpoint that cannot be read or is no ViT raises
    InputError / FileNotFoundError naming it, on one line."""
    fingerprint = file_sha256(checkpoint)
    try:
        return load_encoder(checkpoint, num_heads), fingerprint
    except (RuntimeError, ValueError) as e:  # cdgmae: "path: cannot read checkpoint (...)", bad layout
        text = ev.one_line(e)
        text = text if len(text) <= 240 else text[:237] + "..."
        raise ev.InputError(f"{text} (give a CDG-MAE, MAE, CropMAE or DINO ViT checkpoint)") from None


def check_settings(settings):
    """Range checks of the protocol settings (the command line checks them when parsing)."""
    rules = [("topk", settings["topk"] >= 1, ">= 1"), ("queue_length", settings["queue_length"] >= 0, ">= 0"),
             ("radius", settings["radius"] > 0, "> 0"), ("temperature", settings["temperature"] > 0, "> 0"),
             ("input_size", len(settings["input_size"]) in (1, 2) and min(settings["input_size"]) >= 1,
              "(height, width) or (long side,), each >= 1"),
             ("size_multiple", settings["size_multiple"] >= 1, ">= 1"), ("batch_size", settings["batch_size"] >= 1, ">= 1")]
    for key, ok, rule in rules:
        if not ok:
            raise ev.InputError(f"--{key.replace('_', '-')} {settings[key]}: must be {rule}")


def check_record(record, settings):
    """Refuse (InputError, one line) an output folder whose propagation.json records settings
    that differ from `settings` in a key of PROTOCOL_KEYS."""
    if not record.exists():
        return
    try:
        previous = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        raise ev.InputError(f"{record}: cannot read the recorded settings ({e}) (use another --output)") from None

    def show(key, value):
        return "not recorded" if value is None else value[:12] if key == "checkpoint_sha256" else value
    changed = [f"{k}: {show(k, previous.get(k))} -> {show(k, settings.get(k))}"
               for k in PROTOCOL_KEYS if previous.get(k) != settings.get(k)]
    if changed:
        raise ev.InputError(f"{record}: predictions in this folder were made with other settings "
                            f"({'; '.join(changed)}); use another --output, or the same settings to resume")


def propagate_dataset(dataset, data_root, encoder, output, *, topk=None, queue_length=None, radius=None,
                      temperature=None, input_size=None, size_multiple=64, list_file=None, videos=None,
                      subset="val", resolution="480p", batch_size=8, device=None, num_heads=None,
                      visualize=False, visualize_frames=6, progress=True):
    """Propagate the first-frame labels of every video of a benchmark and write the predictions
    under `output` in the formats evaluate.py (and the official evaluators) read.

    encoder: a VisionTransformer or a checkpoint path. Settings left None take the paper's
    values for the dataset (PROTOCOL). Every video is checked first (prepare_videos). Finished
    videos are skipped, so a rerun resumes; the settings and a sha256 of the checkpoint file
    (of the weights for a module) are recorded in output/propagation.json, and a rerun into
    the same folder with other settings or another checkpoint content is refused. Leftovers
    of killed runs are removed. Returns {"settings", "written", "skipped"}.
    """
    if dataset not in PROTOCOL:
        raise ev.InputError(f"unknown dataset {dataset!r} (expected one of {', '.join(ev.DATASETS)})")
    defaults = PROTOCOL[dataset]
    given = dict(topk=topk, queue_length=queue_length, radius=radius, temperature=temperature, input_size=input_size)
    settings = dict(dataset=dataset, checkpoint=None, checkpoint_sha256=None,
                    **{k: defaults[k] if v is None else v for k, v in given.items()},  # 0 is a value, not "unset"
                    size_multiple=size_multiple, resolution=resolution, batch_size=batch_size)
    settings["input_size"] = list(settings["input_size"])
    check_settings(settings)
    names = videos or ev.list_videos(dataset, data_root, list_file, subset)
    if isinstance(encoder, (str, Path)):
        settings["checkpoint"] = str(Path(encoder).resolve())
        encoder, settings["checkpoint_sha256"] = load_checkpoint_encoder(encoder, num_heads)
    else:
        settings["checkpoint_sha256"] = weights_sha256(encoder)
    settings["encoder"] = dict(embed_dim=encoder.embed_dim, depth=encoder.depth, num_heads=encoder.num_heads,
                               patch_size=encoder.patch_size)
    prepared = prepare_videos(dataset, data_root, names, settings, encoder.patch_size)
    output = Path(output)
    record = output / "propagation.json"
    check_record(record, settings)

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = encoder.to(device).eval()
    output.mkdir(parents=True, exist_ok=True)
    for folder in [output, output / "visualize"] + [output / name for name in names if dataset == "jhmdb"]:
        remove_stale_writes(folder)
    if not record.exists():  # a resume keeps the first run's record (same protocol, checked above)
        ev.atomic_save(record, lambda tmp: tmp.write_text(json.dumps(settings, indent=2) + "\n"))

    written, skipped = [], []
    for name, frames, extra, size in tqdm(prepared, desc=f"{dataset} videos", disable=not progress):
        final = output_path(dataset, output, name)
        if final.exists():
            skipped.append(name)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            propagate_video(dataset, encoder, frames, extra, size, final, settings, device, progress)
            written.append(name)
        strip = output / "visualize" / f"{name.replace('/', '__')}.png"
        if visualize and not strip.exists():
            visualize_video(dataset, frames, final, strip, extra, visualize_frames)
    return {"settings": settings, "written": written, "skipped": skipped}


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the module docstring as written and the defaults that are not None."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dataset", required=True, choices=ev.DATASETS)
    p.add_argument("--data-root", required=True, type=Path,
                   help="dataset folder in its native layout: DAVIS (JPEGImages/480p, Annotations/480p, "
                        "ImageSets/2017), VIP_Fine (Images, Annotations/Category_ids, lists), JHMDB "
                        "(Rename_Images, joint_positions, splits)")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="encoder checkpoint: CDG-MAE (cdgmae.py), MAE, CropMAE or DINO (plain backbone or "
                        "training checkpoint with 'teacher')")
    p.add_argument("--output", required=True, type=Path,
                   help="prediction folder: DAVIS <seq>/<frame>.png (palette), VIP <video>/<frame>.png "
                        "(class ids), JHMDB <class>/<video>/joint_positions.mat; visualize/ holds the strips")
    p.add_argument("--list", dest="list_file", type=Path, default=None,
                   help="video list: one name per line, or CropMAE's two-column lists (davis_vallist_480_880.txt, "
                        "vip_vallist.txt, jhmdb_vallist.txt). Default: DAVIS ImageSets/2017/<subset>.txt, VIP "
                        "lists/<subset>_videos.txt (else all), JHMDB splits/*_test_split1.txt test videos (else all)")
    p.add_argument("--videos", nargs="+", default=None, help="only these videos (JHMDB: <class>/<video>)")
    p.add_argument("--subset", default="val", help="DAVIS / VIP list name")
    p.add_argument("--resolution", default="480p", help="DAVIS resolution folder")
    g = p.add_argument_group("protocol (default: the dataset's value)")
    g.add_argument("--topk", type=checked(int, 1), default=None,
                   help="neighbours whose labels are averaged, >= 1 (7 / 10 / 7)")
    g.add_argument("--queue-length", type=checked(int, 0), default=None,
                   help="previous frames in the context, >= 0 (0: frame 0 only) (20)")
    g.add_argument("--radius", type=checked(float, 0, low_open=True), default=None,
                   help="queue keys must lie strictly within this many feature cells of the query, > 0 (20)")
    g.add_argument("--temperature", type=checked(float, 0, low_open=True), default=None,
                   help="softmax temperature over the top-k, > 0 (0.7)")
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
    g.add_argument("--threads", type=checked(int, 1), default=None, help="torch CPU threads (default: torch's)")
    g = p.add_argument_group("extras")
    g.add_argument("--visualize", action=argparse.BooleanOptionalAction, default=False,
                   help="write output/visualize/<video>.png: frames with the propagated masks or joints")
    g.add_argument("--visualize-frames", type=checked(int, 1), default=6, help="frames per strip")
    g.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=False,
                   help="score the predictions with evaluate.py afterwards")
    return p


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
    try:
        result = propagate_dataset(
            args.dataset, args.data_root, args.checkpoint, args.output, topk=args.topk,
            queue_length=args.queue_length, radius=args.radius, temperature=args.temperature,
            input_size=args.input_size, size_multiple=args.size_multiple, list_file=args.list_file,
            videos=args.videos, subset=args.subset, resolution=args.resolution, batch_size=args.batch_size,
            device=args.device, num_heads=args.num_heads,
            visualize=args.visualize, visualize_frames=args.visualize_frames)
    except (ev.InputError, FileNotFoundError) as e:
        raise SystemExit(ev.one_line(e)) from None
    except OSError as e:
        if e.errno not in ev.EXPECTED_OS_ERRORS:
            raise
        raise SystemExit(ev.one_line(e)) from None
    print(f"{len(result['written'])} videos propagated, {len(result['skipped'])} already done -> {args.output}")
    if args.evaluate:
        ev.main(["--dataset", args.dataset, "--data-root", str(args.data_root), "--predictions", str(args.output),
                 "--subset", args.subset, "--resolution", args.resolution]
                + (["--list", str(args.list_file)] if args.list_file else [])
                + (["--videos", *args.videos] if args.videos else []))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
