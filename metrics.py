"""View-consistency metrics of CDG-MAE (Sec. 3.2, Eq. 1-3) and the evaluation of Tables 1 and 9.

For a pair of views (V1, V2), with f_*(V) the [CLS] token and f_i(V) the i-th of L patch
tokens of a ViT's last block after its final norm (the paper uses MAE's ViT-B/16):

    GS(V1, V2)  = sim(f_*(V1), f_*(V2))                                     Eq. (1), high: same semantics
    LS(V1, V2)  = 1/L sum_i sim(f_i(V1), f_i(V2))                           Eq. (2), low: local changes
    NPS(V1, V2) = 1/L sum_i max_j sim(f_i(V1), f_j(V2))                     Eq. (3), high: same content

with sim the cosine similarity. NPS >= LS always (j = i is one of the candidates).

Pair sets (Table 1): video frames (a DAVIS-layout folder, frames t and t + gap), bags of
views (the real image vs one of its generated views), k-NN image pairs (a query and one of its
k = 5 nearest neighbours by cls cosine similarity) and random image pairs; each a fixed number
of pairs (500) drawn with a seed.

The MIMIC overlap (MIMIC appendix Sec. 2.2; SIFT, RANSAC homography, uniquely matched 16 x 16
patches) is a fourth, geometric column; it needs OpenCV, imported only when used.

What you may copy: the method comes first in this file, the plumbing after it.
`global_similarity`, `local_similarity` and `nearest_patch_similarity` (Eq. 1-3) need only
torch tensors; `nearest_neighbours` (the chunked k-NN search) torch and numpy. `evaluate_pairs`
and `cls_features` need a ViT whose `forward_features` returns the tokens after the final
norm, cls first ([B, 1 + L, D]; cdgmae.VisionTransformer), PIL, tqdm and load_rgb /
image_to_tensor. The pair sets (`video_pairs`, `bag_pairs`, `random_pairs`) need numpy's
Generator and file paths (`bag_pairs`: find_bags / bag_files). Of the MIMIC overlap,
`matched_patches`, `unique_match_fraction` and `homography_overlap` need only numpy;
`mimic_overlap` adds OpenCV's SIFT and RANSAC and PIL. The rest is plumbing: the input
checks, the table and CSV, and the command line.

Usage:
    python metrics.py --checkpoint mae_pretrain_vit_base.pth --video DAVIS --bags bags/ \\
        --images imagenet/train --csv table1.csv      # an existing table1.csv: refused unless --overwrite
    python metrics.py overlap A.jpg B.jpg                     # MIMIC overlap of two images
Import:
    from metrics import global_similarity, local_similarity, nearest_patch_similarity, mimic_overlap
"""
import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import cdgmae
from common import (IMAGE_SUFFIXES, UnreadableImage, bag_files, check_output_folder, checked, file_sha256, find_bags,
                    load_rgb, one_line, open_image, raise_error, read_record, refuse_other_settings, run_command,
                    to_rgb, write_csv, write_failure, write_json)

PAPER_TABLE1 = {  # Table 1 (Table 9 adds RCG S-LDM: 0.951 / 0.299 / 0.735)
    "Video frames": (0.991, 0.405, 0.885),
    "Diffusion (S-LDM)": (0.991, 0.384, 0.794),
    "K-nn images": (0.955, 0.310, 0.722),
    "Random images": (0.894, 0.181, 0.605),
}


# -----------------------------------------------------------------------------
# Eq. (1)-(3)
# -----------------------------------------------------------------------------

def global_similarity(cls_a, cls_b):
    """Eq. (1): cosine similarity of the global embeddings. cls_a, cls_b [B, D] -> [B]."""
    return (F.normalize(cls_a, dim=-1) * F.normalize(cls_b, dim=-1)).sum(-1)


def local_similarity(patches_a, patches_b):
    """Eq. (2): cosine similarity of the patches at the same location, averaged over the L
    locations. patches_a, patches_b [B, L, D] -> [B]."""
    return (F.normalize(patches_a, dim=-1) * F.normalize(patches_b, dim=-1)).sum(-1).mean(-1)


def nearest_patch_similarity(patches_a, patches_b):
    """Eq. (3): for each patch of V1 the highest cosine similarity to any patch of V2, averaged
    over V1's L patches. patches_a [B, L, D], patches_b [B, L2, D] -> [B]."""
    sim = F.normalize(patches_a, dim=-1) @ F.normalize(patches_b, dim=-1).transpose(1, 2)  # [B, L, L2]
    return sim.max(dim=-1).values.mean(-1)


# -----------------------------------------------------------------------------
# The features f_* and f_i of a pair's views, and the scores of a set of pairs
# -----------------------------------------------------------------------------

def evaluation_image(img, size=224, center_crop=True):
    """The PIL size x size image that evaluation_tensor normalises."""
    if center_crop:
        w, h = img.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), Image.BICUBIC)
    return img


def evaluation_tensor(img, size=224, center_crop=True):
    """PIL RGB -> ImageNet-normalised [3, size, size]: the shorter side resized to `size` (bicubic)
    then a centre crop, or (center_crop=False) the whole image resized to size x size."""
    return cdgmae.image_to_tensor(evaluation_image(img, size, center_crop))


@torch.no_grad()
def view_features(vit, images):
    """images [B, 3, H, W] -> (cls [B, D], patches [B, L, D]) of the last block after the final norm."""
    tokens = vit.forward_features(images)
    return tokens[:, 0], tokens[:, 1:]


class PairImages(torch.utils.data.Dataset):
    """(V1 [3, S, S], V2 [3, S, S]) of each pair of image paths (or a 1-tuple for single images)."""

    def __init__(self, pairs, size=224, center_crop=True):
        self.pairs, self.size, self.center_crop = pairs, size, center_crop

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return tuple(evaluation_tensor(load_rgb(p), self.size, self.center_crop) for p in self.pairs[i])


@torch.no_grad()
def evaluate_pairs(vit, pairs, size=224, center_crop=True, batch_size=64, workers=4, device="cpu", desc="pairs"):
    """GS, LS and NPS of every pair: {"gs": [P], "ls": [P], "nps": [P]} (CPU tensors)."""
    loader = torch.utils.data.DataLoader(PairImages(pairs, size, center_crop), batch_size=batch_size,
                                         num_workers=workers)
    scores = {"gs": [], "ls": [], "nps": []}
    for a, b in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        cls, patches = view_features(vit, torch.cat([a, b]).to(device))
        n = a.shape[0]
        scores["gs"].append(global_similarity(cls[:n], cls[n:]).cpu())
        scores["ls"].append(local_similarity(patches[:n], patches[n:]).cpu())
        scores["nps"].append(nearest_patch_similarity(patches[:n], patches[n:]).cpu())
    return {k: torch.cat(v) for k, v in scores.items()}


@torch.no_grad()
def cls_features(vit, paths, size=224, center_crop=True, batch_size=64, workers=4, device="cpu"):
    """cls tokens [N, D] of single images (for the k-NN search)."""
    dataset = PairImages([(p,) for p in paths], size, center_crop)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    out = []
    for (a,) in tqdm(loader, desc="k-NN pool features", unit="batch", leave=False, disable=None):
        out.append(view_features(vit, a.to(device))[0].cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# Pair sets (Table 1)
# -----------------------------------------------------------------------------

def bag_pairs(root, num_pairs, rng):
    """(real, generated view) pairs: `num_pairs` distinct bags, one of each bag's views at random
    (all (real, view) pairs, sampled without replacement, when there are fewer bags)."""
    bags = []
    for bag in find_bags(root):
        real, views = bag_files(Path(root) / bag)
        if views:
            bags.append((real, views))
    if not bags:
        raise ValueError(f"{root}: no bag with a real.* image and generated views (give a generate_views.py output)")
    if len(bags) >= num_pairs:
        chosen = rng.choice(len(bags), num_pairs, replace=False)
        return [(bags[i][0], bags[i][1][rng.integers(len(bags[i][1]))]) for i in chosen]
    every = [(real, view) for real, views in bags for view in views]
    return [every[i] for i in rng.choice(len(every), min(num_pairs, len(every)), replace=False)]


def video_pairs(root, num_pairs, frame_gap, rng):
    """(frame t, frame t + gap) pairs from a DAVIS-layout folder (JPEGImages/480p/<seq>/*.jpg, or a
    folder of sequence folders), drawn uniformly without replacement among every valid (seq, t)."""
    root = Path(root)
    frames_root = root / "JPEGImages" / "480p" if (root / "JPEGImages" / "480p").is_dir() else root
    if not frames_root.is_dir():
        raise FileNotFoundError(f"{root}: video folder not found (give a DAVIS-layout folder)")
    if frame_gap < 1:
        raise ValueError(f"--frame-gap {frame_gap}: must be at least 1")
    candidates = []
    for seq in sorted(d for d in frames_root.iterdir() if d.is_dir()):
        frames = sorted(f for f in seq.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        candidates += [(frames[t], frames[t + frame_gap]) for t in range(len(frames) - frame_gap)]
    if not candidates:
        raise ValueError(f"{frames_root}: no sequence has more than {frame_gap} frames (lower --frame-gap or give "
                         f"a folder of sequence folders)")
    return [candidates[i] for i in rng.choice(len(candidates), min(num_pairs, len(candidates)), replace=False)]


def list_image_files(root):
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found (give a folder of images)")
    paths = sorted(Path(d) / f for d, _, files in os.walk(root, onerror=raise_error) for f in files
                   if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES))
    if len(paths) < 2:
        raise ValueError(f"{root}: needs at least two images, found {len(paths)} (give a folder of images)")
    return paths


def random_pairs(paths, num_pairs, rng):
    """Pairs of two different images drawn uniformly."""
    pairs = []
    for _ in range(num_pairs):
        i, j = rng.choice(len(paths), 2, replace=False)
        pairs.append((paths[i], paths[j]))
    return pairs


@torch.no_grad()
def nearest_neighbours(features, k, queries=None, chunk=4096):
    """The k nearest OTHER rows of each query by cosine similarity, nearest first.

    features [N, D] (on any device: the search runs there); queries: row indices [Q] (every
    row when None) -> indices [Q, k] (int64, on features' device). Queries and candidates are
    taken `chunk` rows at a time: one [chunk, D] x [D, chunk] product per pair of chunks, whose
    best k per row are merged into a running top-k, so memory stays O(chunk^2 + Q k) and no
    [Q, N] matrix is ever held. A query is excluded by its index (a duplicate is still found).
    """
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"k-NN with k = {k} needs more than {k} images, got {n}")
    feats = F.normalize(features.float(), dim=-1)
    device = feats.device
    queries = (torch.arange(n, device=device) if queries is None
               else torch.as_tensor(np.asarray(queries), dtype=torch.long).to(device))
    out = []
    for query in queries.split(chunk):
        rows = torch.arange(len(query), device=device)
        best_sim = torch.full((len(query), k), -float("inf"), device=device)       # running top-k
        best_idx = torch.zeros((len(query), k), dtype=torch.long, device=device)
        query_feats = feats[query]                                                 # [c, D]
        for start in range(0, n, chunk):
            sim = query_feats @ feats[start:start + chunk].T                       # [c, c'] cosines
            own = query - start
            inside = (own >= 0) & (own < sim.shape[1])
            sim[rows[inside], own[inside]] = -float("inf")                         # the query is no neighbour
            chunk_sim, chunk_idx = sim.topk(min(k, sim.shape[1]), dim=1)           # this chunk's best
            merged_sim = torch.cat([best_sim, chunk_sim], dim=1)                   # [c, k + k']
            merged_idx = torch.cat([best_idx, chunk_idx + start], dim=1)
            best_sim, top = merged_sim.topk(k, dim=1)                              # sorted: nearest first
            best_idx = merged_idx.gather(1, top)
        out.append(best_idx)
    return torch.cat(out)


def knn_pairs_from_features(cls, queries, k, rng, chunk=4096):
    """For each query index, one of its k nearest neighbours (cosine similarity of cls [N, D],
    the query itself excluded) at random: a list of (query, neighbour) index pairs."""
    queries = torch.as_tensor(np.asarray(queries), dtype=torch.long)
    neighbours = nearest_neighbours(cls, k, queries, chunk)          # [Q, k]
    pick = torch.as_tensor(rng.integers(k, size=len(queries)))
    return [(int(q), int(neighbours[r, pick[r]])) for r, q in enumerate(queries)]


# -----------------------------------------------------------------------------
# MIMIC overlap (MIMIC appendix, Sec. 2.2): a geometric overlap of two views, a fourth
# column next to GS / LS / NPS. Settings as in MIMIC's released mining code: SIFT, brute-force
# k = 2 matching with Lowe's ratio test at 0.7, more than 10 good matches, RANSAC homography
# (reprojection threshold 5 px), 16 x 16 patches, 100 random pixels per patch.
# The six steps of App. 2.2 are numbered in the docstrings below.
# -----------------------------------------------------------------------------

# App. 2.2: "we retained pairs with an overlap ranging from 50% to 75%"; MIMIC's mining code keeps
# 50 < overlap < 75 (percent), both ends excluded. (App. 2.1's 50-70% is a different step: how
# pairs of street views and simulator views were chosen before any overlap was measured.)
MIMIC_KEEP_RANGE = (0.5, 0.75)


def import_cv2():
    """OpenCV, imported only by the overlap code, so that GS / LS / NPS work without it."""
    try:
        import cv2
    except ImportError:
        raise ImportError("OpenCV is missing: the MIMIC overlap needs it "
                          "(pip install opencv-python-headless==5.0.0.93)") from None
    return cv2


def gray_uint8(image):
    """PIL image of any mode (made RGB by to_rgb's rule) or uint8 array [H, W] / [H, W, 3]
    (RGB) -> uint8 grey array [H, W] (ITU-R 601 luma)."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8:  # a cast would wrap 16-bit values around (300 -> 44)
            raise ValueError(f"an image array of {array.dtype}, not uint8 (convert it to 8 bits, e.g. a 16-bit "
                             f"one with >> 8, or pass a PIL image)")
        image = Image.fromarray(array)
    return np.asarray(to_rgb(image).convert("L"))


def estimate_homography(gray_a, gray_b, ratio=0.7, min_matches=11, ransac_threshold=5.0):
    """Steps 1-3: SIFT keypoints, brute-force matching, RANSAC homography from view a to view b.

    Each descriptor of a is matched to its two nearest of b (L2) and kept when the nearest is
    closer than `ratio` times the second (Lowe's ratio test; MIMIC's code uses 0.7). Returns
    (H [3, 3] mapping a's pixel coordinates to b's, or None; {"matches", "inliers", "reason"}).
    """
    cv2 = import_cv2()
    sift = cv2.SIFT_create()
    kp_a, des_a = sift.detectAndCompute(gray_a, None)
    kp_b, des_b = sift.detectAndCompute(gray_b, None)
    info = {"matches": 0, "inliers": 0, "reason": None}
    if des_a is None or des_b is None or len(kp_a) < 2 or len(kp_b) < 2:
        info["reason"] = f"too few SIFT keypoints ({len(kp_a)} and {len(kp_b)})"
        return None, info
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(des_a, des_b, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    info["matches"] = len(good)
    if len(good) < min_matches:
        info["reason"] = f"{len(good)} matches pass the ratio test, fewer than {min_matches}"
        return None, info
    src = np.float32([kp_a[m.queryIdx].pt for m in good]).reshape(-1, 1, 2)
    dst = np.float32([kp_b[m.trainIdx].pt for m in good]).reshape(-1, 1, 2)
    H, inliers = cv2.findHomography(src, dst, cv2.RANSAC, ransac_threshold)
    if H is None or abs(np.linalg.det(H)) < 1e-12:
        info["reason"] = f"RANSAC found no homography from {len(good)} matches"
        return None, info
    info["inliers"] = int(inliers.sum())
    return H, info


def matched_patches(H, shape_a, shape_b, patch_size=16, points_per_patch=100, rng=None):
    """Steps 4-5: the patch of view b matched to each patch of view a, -1 for "outside".

    For every patch of a (row-major over a's (H_a // P) x (W_a // P) grid), `points_per_patch`
    random pixels of the patch (pixel centres, OpenCV's coordinates) are mapped by H; each lands
    in a patch of b or outside it, and the most frequent landing (outside included) is the match.
    shape_a, shape_b: (height, width). Returns int array [patches of a].
    """
    rng = np.random.default_rng(rng)
    (rows_a, cols_a), (rows_b, cols_b) = [(h // patch_size, w // patch_size) for h, w in (shape_a, shape_b)]
    num = rows_a * cols_a
    offsets = rng.integers(0, patch_size, size=(num, points_per_patch, 2))   # (dx, dy) inside a patch
    origin = np.stack(np.divmod(np.arange(num), cols_a)[::-1], axis=1) * patch_size  # (x, y) corners
    xy = (origin[:, None, :] + offsets).reshape(-1, 2).astype(np.float64)
    mapped = np.concatenate([xy, np.ones((len(xy), 1))], axis=1) @ np.asarray(H, np.float64).T
    w = mapped[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        x, y = mapped[:, 0] / w, mapped[:, 1] / w
    inside = (w > 0) & (x >= 0) & (y >= 0) & (x < cols_b * patch_size) & (y < rows_b * patch_size)
    landing = np.full(len(xy), -1)
    landing[inside] = (y[inside] // patch_size).astype(int) * cols_b + (x[inside] // patch_size).astype(int)
    landing = landing.reshape(num, points_per_patch)
    votes = np.apply_along_axis(np.bincount, 1, landing + 1, minlength=rows_b * cols_b + 1)
    return votes.argmax(axis=1) - 1  # ties go to "outside", then to the lower patch index


def unique_match_fraction(matches):
    """Step 6: patches of view a whose match lies inside view b and was not taken by an earlier
    patch (row-major order), over all patches of view a."""
    taken = set()
    for m in matches:
        if m >= 0 and m not in taken:
            taken.add(int(m))
    return len(taken) / len(matches)


def homography_overlap(H, shape_a, shape_b, patch_size=16, points_per_patch=100, seed=0):
    """min(overlap(a -> b) by H, overlap(b -> a) by H^-1), MIMIC's overlap for a known homography.
    Returns (overlap, a_to_b, b_to_a)."""
    rng = np.random.default_rng(seed)
    a_to_b = unique_match_fraction(matched_patches(H, shape_a, shape_b, patch_size, points_per_patch, rng))
    b_to_a = unique_match_fraction(matched_patches(np.linalg.inv(H), shape_b, shape_a, patch_size,
                                                   points_per_patch, rng))
    return min(a_to_b, b_to_a), a_to_b, b_to_a


def mimic_overlap_report(image_a, image_b, patch_size=16, points_per_patch=100, seed=0, ratio=0.7,
                         min_matches=11, ransac_threshold=5.0):
    """MIMIC's overlap of two views with its parts: {"overlap", "a_to_b", "b_to_a", "matches",
    "inliers", "reason"}; reason is None, or why no homography was found (overlap 0 then)."""
    gray_a, gray_b = gray_uint8(image_a), gray_uint8(image_b)
    for gray in (gray_a, gray_b):
        if min(gray.shape) < patch_size:
            raise ValueError(f"image of {gray.shape[1]}x{gray.shape[0]} pixels is smaller than one "
                             f"{patch_size}x{patch_size} patch")
    H, info = estimate_homography(gray_a, gray_b, ratio, min_matches, ransac_threshold)
    if H is None:
        return {"overlap": 0.0, "a_to_b": 0.0, "b_to_a": 0.0, **info}
    overlap, a_to_b, b_to_a = homography_overlap(H, gray_a.shape, gray_b.shape, patch_size,
                                                 points_per_patch, seed)
    return {"overlap": overlap, "a_to_b": a_to_b, "b_to_a": b_to_a, **info}


def mimic_overlap(image_a, image_b, patch_size=16, points_per_patch=100, seed=0, **kwargs):
    """MIMIC's overlap (appendix Sec. 2.2) of two views, in [0, 1]; 0 when no homography is found
    (mimic_overlap_report says why). image_a, image_b: PIL images or uint8 arrays."""
    return mimic_overlap_report(image_a, image_b, patch_size, points_per_patch, seed, **kwargs)["overlap"]


def in_mimic_keep_range(overlap, keep_range=MIMIC_KEEP_RANGE):
    """Whether MIMIC would keep a pair of this overlap: keep_range[0] < overlap < keep_range[1], both
    ends excluded as in MIMIC's code (True / False; works on arrays too)."""
    return (np.asarray(overlap) > keep_range[0]) & (np.asarray(overlap) < keep_range[1])


def pair_overlaps(pairs, size=224, center_crop=True, seed=0, desc="overlap"):
    """MIMIC overlap of each pair of image paths, on the same evaluation crops the ViT sees
    (evaluation_image), so that its 16 x 16 patches are the ViT's patches. Returns [P] tensor."""
    values = []
    for i, (path_a, path_b) in enumerate(tqdm(pairs, desc=desc, unit="pair", leave=False, disable=None)):
        a, b = (evaluation_image(load_rgb(p), size, center_crop) for p in (path_a, path_b))
        values.append(mimic_overlap(a, b, seed=seed + i))
    return torch.tensor(values, dtype=torch.float64)


# -----------------------------------------------------------------------------
# Checks before any feature is computed
# -----------------------------------------------------------------------------

def decode_problem(path):
    """None if the image decodes completely and to_rgb converts it (its mode, its size, a
    32-bit image's values), else the reason. JPEGs are decoded at 1/8 scale (libjpeg's DCT
    scaling), which still reads every byte, so truncation is found cheaply."""
    try:
        with open_image(path) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            to_rgb(im, path)
        return None
    except UnreadableImage as e:
        return str(e).removeprefix(f"{path}: ")
    except Exception as e:  # noqa: BLE001 -- whatever stops the decoder is this file's problem
        return f"cannot decode image ({type(e).__name__}: {e})"


def check_images_decode(paths, threads=8):
    """Raise ValueError (one line, naming the first bad file) if any image does not decode."""
    paths = sorted(set(map(str, paths)))
    with ThreadPoolExecutor(threads) as pool:
        bad = [(p, why) for p, why in zip(paths, pool.map(decode_problem, paths)) if why]
    if bad:
        others = f"; {len(bad) - 1} more: {[p for p, _ in bad[1:4]]}" if len(bad) > 1 else ""
        raise ValueError(f"{bad[0][0]}: {bad[0][1]}{others} "
                         f"(replace or remove the files; pair sets are drawn from the files present)")


def load_vit(checkpoint, input_size, num_heads=None):
    """The ViT of --checkpoint (cdgmae.encoder_from_checkpoint; num_heads None: its rule), for
    --input-size, which must be a multiple of its patch size (the position embedding is resized
    to that grid in the forward pass)."""
    vit = cdgmae.encoder_from_checkpoint(checkpoint, num_heads=num_heads)
    if input_size < vit.patch_size or input_size % vit.patch_size:
        raise ValueError(f"--input-size {input_size}: not a multiple of the patch size {vit.patch_size} of {checkpoint}")
    return vit


def metrics_settings(args, checkpoint_sha256):
    """What the table depends on, recorded beside the CSV (`record_path`): the ViT's bytes, the
    pair sets' sources (real paths) and every setting that draws or scores the pairs."""
    resolve = lambda path: path and os.path.realpath(path)  # noqa: E731
    return {"checkpoint": os.path.realpath(args.checkpoint), "checkpoint_sha256": checkpoint_sha256,
            "video": resolve(args.video), "bags": [resolve(b) for b in args.bags], "images": resolve(args.images),
            **{key: getattr(args, key) for key in ("bag_names", "frame_gap", "knn", "knn_pool", "num_pairs", "seed",
                                                   "input_size", "center_crop", "overlap")}}


def record_path(csv_path):
    """The settings record of a table: the CSV's name with .json."""
    return Path(csv_path).with_suffix(".json")


def check_csv(path, overwrite, settings=None):
    """The CSV may be written: its folder exists and is writable, and an existing file is replaced
    only with --overwrite (a folder never). An existing table made with other settings is named
    with every difference (common.refuse_other_settings)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: a folder (give a file name to --csv)")
    if path.exists() and not overwrite:
        way_out = "give another --csv, or --overwrite to replace it"
        if settings is not None and record_path(path).exists():
            refuse_other_settings(record_path(path), read_record(record_path(path), way_out), settings,
                                  made=f"the table {path.name} was made", what_to_do=way_out)
        raise ValueError(f"{path}: exists, not overwritten ({way_out})")
    if not path.parent.is_dir():
        check_output_folder(path.parent, "--csv")  # a file on the way is named as such
        raise FileNotFoundError(f"{path.parent}: folder of --csv not found (create it or give another --csv)")
    check_output_folder(path.parent, "--csv")


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

def format_table1(rows):
    """Rows {"pairs", "num_pairs", "gs", "ls", "nps", ...} in the form of Table 1 (plus the MIMIC
    overlap column when the rows have "overlap")."""
    overlap = all("overlap" in r for r in rows)
    lines = [f"{'Views':<22}{'Global Sim. (up)':>18}{'Local Sim. (down)':>19}{'Nearest Patch Sim. (up)':>25}"
             + (f"{'MIMIC overlap':>15}" if overlap else "") + f"{'pairs':>7}{'paper GS/LS/NPS':>22}"]
    for r in rows:
        paper = PAPER_TABLE1.get(r["pairs"])
        ref = "/".join(f"{v:.3f}" for v in paper) if paper else "-"
        lines.append(f"{r['pairs']:<22}{r['gs']:>18.3f}{r['ls']:>19.3f}{r['nps']:>25.3f}"
                     + (f"{r['overlap']:>15.3f}" if overlap else "") + f"{r['num_pairs']:>7}{ref:>22}")
    return "\n".join(lines)


def write_table(rows, path, overwrite=True):
    """Write the table atomically. overwrite=False: never replace an existing file, even one
    another run wrote meanwhile (FileExistsError)."""
    fields = ["pairs", "num_pairs", "gs", "gs_std", "ls", "ls_std", "nps", "nps_std"]
    if all("overlap" in r for r in rows):
        fields += ["overlap", "overlap_std", "in_mimic_range"]
    rows = [{k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in fields} for r in rows]
    write_csv(path, rows, fields, exclusive=not overwrite)


def summarize(name, scores):
    row = {"pairs": name, "num_pairs": len(scores["gs"])}
    for k, v in scores.items():
        row[k], row[f"{k}_std"] = v.mean().item(), (v.std().item() if len(v) > 1 else 0.0)
    return row


def get_args_parser():
    p = argparse.ArgumentParser(
        description="GS / LS / NPS (CDG-MAE Eq. 1-3) of pair sets, printed as in Table 1 and written to a CSV. "
                    "Give any of --video, --bags, --images (the last gives the k-NN and random rows).",
        epilog="python metrics.py overlap A B: MIMIC's overlap of two images (see its --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="ViT checkpoint for f_* and f_i (paper: MAE ViT-B/16)")
    p.add_argument("--video", default=None, help="DAVIS-layout folder (JPEGImages/480p/<seq>/*.jpg): frame pairs")
    p.add_argument("--frame-gap", type=checked(int, 1), default=10, help="frames between the two frames of a video pair")
    p.add_argument("--bags", nargs="*", default=[], help="bag roots (generate_views.py output): real vs view pairs")
    p.add_argument("--bag-names", nargs="*", default=None, help="row names of the --bags roots; unset: "
                                                                "'Diffusion (S-LDM)' for one root")
    p.add_argument("--images", default=None, help="image folder (e.g. ImageNet train): k-NN and random pairs")
    p.add_argument("--knn", type=checked(int, 1), default=5, help="k of the k-NN pairs")
    p.add_argument("--knn-pool", type=checked(int, 2), default=10000,
                   help="images drawn from --images for the k-NN search (more than --knn)")
    p.add_argument("--num-pairs", type=checked(int, 1), default=500, help="pairs per set")
    p.add_argument("--seed", type=checked(int, 0), default=0)
    p.add_argument("--input-size", type=checked(int, 1), default=224,
                   help="side of the evaluated images, a multiple of the checkpoint's patch size")
    p.add_argument("--num-heads", type=checked(int, 1), default=None,
                   help="attention heads of the ViT (default: its checkpoint's args, else width / 64)")
    p.add_argument("--center-crop", action=argparse.BooleanOptionalAction, default=True,
                   help="resize the shorter side and centre-crop (else resize the whole image to a square)")
    p.add_argument("--batch-size", type=checked(int, 1), default=64, help="pairs per forward pass")
    p.add_argument("--workers", type=checked(int, 0), default=4)
    p.add_argument("--device", default=None, help="torch device; unset: cuda if available, else cpu")
    p.add_argument("--csv", default="view_metrics.csv", help="where to write the table (an existing file is "
                                                               "an error, checked before any work)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing --csv")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="add MIMIC's geometric overlap (SIFT + RANSAC homography, on the same crops) as a "
                        "column, and the fraction of pairs in MIMIC's keep range (0.5, 0.75), ends excluded, "
                        "to the CSV")
    return p


def draw_pair_sets(args, names):
    """[(row name, pairs)] of every requested set, drawn before any feature is computed so that bad
    input fails fast; the k-NN entry is (pool paths, query indices, its rng), resolved on features."""
    def rng(i):
        return np.random.default_rng([args.seed, i])  # one stream per set: sets do not depend on each other
    pair_sets = []
    if args.video:
        pair_sets.append(("Video frames", video_pairs(args.video, args.num_pairs, args.frame_gap, rng(0))))
    for name, root in zip(names, args.bags):  # same stream: bag roots of the same images pick the same bags
        pair_sets.append((name, bag_pairs(root, args.num_pairs, rng(1))))
    if args.images:
        paths = list_image_files(args.images)
        knn_rng = rng(2)
        pool = [paths[i] for i in sorted(knn_rng.choice(len(paths), min(args.knn_pool, len(paths)), replace=False))]
        if len(pool) <= args.knn:
            raise ValueError(f"{args.images}: the k-NN pool holds {len(pool)} images, needs more than --knn {args.knn} "
                             f"(lower --knn or give more images)")
        queries = knn_rng.choice(len(pool), min(args.num_pairs, len(pool)), replace=False)
        pair_sets.append(("K-nn images", (pool, queries, knn_rng)))
        pair_sets.append(("Random images", random_pairs(paths, args.num_pairs, rng(3))))
    return pair_sets


def get_overlap_parser():
    p = argparse.ArgumentParser(prog="metrics.py overlap", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="MIMIC's overlap of two views (MIMIC appendix Sec. 2.2): SIFT, "
                                            "ratio-test matching, RANSAC homography, uniquely matched 16x16 "
                                            "patches, the minimum of both directions. Prints the overlap.")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--size", type=checked(int, 0), default=224,
                   help="resize both images to size x size first, as MIMIC does (0: keep their sizes)")
    p.add_argument("--patch-size", type=checked(int, 1), default=16)
    p.add_argument("--points", type=checked(int, 1), default=100, help="random points per patch")
    p.add_argument("--seed", type=checked(int, 0), default=0, help="seeds the random points")
    return p


def overlap_main(argv):
    """`python metrics.py overlap A B`: print the MIMIC overlap of two images."""
    parser = get_overlap_parser()
    args = parser.parse_args(argv)
    if 0 < args.size < args.patch_size:
        parser.error(f"argument --size: {args.size} is smaller than --patch-size {args.patch_size}")
    try:
        import_cv2()
    except ImportError as e:
        raise SystemExit(f"metrics.py overlap: {e}") from None
    images = []
    for path in (args.image_a, args.image_b):
        if not Path(path).is_file():
            raise SystemExit(f"{path}: file not found (give two image files)")
        try:
            img = load_rgb(path)
        except RuntimeError as e:
            raise SystemExit(f"{e} (give two image files)") from None
        images.append(img.resize((args.size, args.size), Image.BILINEAR) if args.size else img)
    try:
        report = mimic_overlap_report(*images, args.patch_size, args.points, args.seed)
    except ValueError as e:
        raise SystemExit(f"{args.image_a}, {args.image_b}: {e}") from None
    print(f"{report['overlap']:.4f}")
    detail = (f"no homography: {report['reason']}" if report["reason"] else
              f"a->b {report['a_to_b']:.4f}, b->a {report['b_to_a']:.4f}; {report['matches']} matches, "
              f"{report['inliers']} RANSAC inliers")
    keep = "yes" if in_mimic_keep_range(report["overlap"]) else "no"
    print(f"{detail}; in MIMIC's keep range ({MIMIC_KEEP_RANGE[0]}, {MIMIC_KEEP_RANGE[1]}), ends excluded: {keep}",
          file=sys.stderr)
    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["overlap"]:  # python metrics.py overlap A B
        return overlap_main(argv[1:])
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.images and args.knn_pool <= args.knn:
        parser.error(f"argument --knn-pool: {args.knn_pool} is not above --knn {args.knn} (an image's neighbours "
                     f"are other images of the pool)")
    if args.overlap:
        try:
            import_cv2()
        except ImportError as e:
            raise SystemExit(f"--overlap: {e}, or pass --no-overlap") from None
    if not (args.video or args.bags or args.images):
        raise SystemExit("nothing to evaluate: give --video, --bags and/or --images")
    names = args.bag_names or (["Diffusion (S-LDM)"] if len(args.bags) == 1 else
                               [f"Diffusion ({Path(b).name})" for b in args.bags])
    if len(names) != len(args.bags):
        raise SystemExit(f"--bag-names: {len(names)} names for {len(args.bags)} --bags roots")
    try:  # every expected failure before any feature is computed, as one line
        check_csv(args.csv, overwrite=True)  # the folder; an existing table below, with the settings known
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: {torch.cuda.device_count()} CUDA devices here (give --device cpu)")
        vit = load_vit(args.checkpoint, args.input_size, args.num_heads).to(device).eval()
        settings = metrics_settings(args, file_sha256(args.checkpoint))
        check_csv(args.csv, args.overwrite, settings)
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: cdgmae.load_checkpoint, torch.device
        raise SystemExit(one_line(e)) from None
    try:
        pair_sets = draw_pair_sets(args, names)
        check_images_decode([p for name, pairs in pair_sets  # the k-NN entry: every image of its pool
                             for group in ([pairs[0]] if name == "K-nn images" else pairs) for p in group])
    except (ValueError, OSError) as e:
        raise SystemExit(one_line(e)) from None

    common = dict(size=args.input_size, center_crop=args.center_crop, batch_size=args.batch_size,
                  workers=args.workers, device=device)
    print(f"{', '.join(name for name, _ in pair_sets)}: features on {device} (the table is written to {args.csv} "
          f"at the end)", file=sys.stderr)
    rows = []
    for name, pairs in pair_sets:
        if name == "K-nn images":
            pool, queries, knn_rng = pairs
            cls = cls_features(vit, pool, **common)
            pairs = [(pool[i], pool[j]) for i, j in knn_pairs_from_features(cls, queries, args.knn, knn_rng)]
        scores = evaluate_pairs(vit, pairs, desc=name, **common)
        if args.overlap:  # MIMIC appendix 2.2, on the crops the ViT saw
            scores["overlap"] = pair_overlaps(pairs, args.input_size, args.center_crop, args.seed, desc=name)
            scores["in_mimic_range"] = torch.from_numpy(in_mimic_keep_range(scores["overlap"].numpy()) * 1.0)
        rows.append(summarize(name, scores))
    print(format_table1(rows))
    try:
        write_table(rows, args.csv, overwrite=args.overwrite)
        write_json(record_path(args.csv), settings)
    except FileExistsError:
        raise SystemExit(f"{args.csv}: written by another run meanwhile, not overwritten (this run's table is "
                         f"printed above; give another --csv or --overwrite)") from None
    except OSError as e:
        raise SystemExit(write_failure(args.csv, e, then="rerun; the table is printed above")) from None
    print(f"wrote {args.csv}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    run_command(main)
