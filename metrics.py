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

Usage:
    python metrics.py --checkpoint mae_pretrain_vit_base.pth --video DAVIS --bags bags/ \\
        --images imagenet/train --csv table1.csv
Import:
    from metrics import global_similarity, local_similarity, nearest_patch_similarity
"""
import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import cdgmae

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
# Features
# -----------------------------------------------------------------------------

def evaluation_tensor(img, size=224, center_crop=True):
    """PIL RGB -> ImageNet-normalised [3, size, size]: the shorter side resized to `size` (bicubic)
    then a centre crop, or (center_crop=False) the whole image resized to size x size."""
    if center_crop:
        w, h = img.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), Image.BICUBIC)
    return cdgmae.image_to_tensor(img)


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
        return tuple(evaluation_tensor(cdgmae.load_rgb(p), self.size, self.center_crop) for p in self.pairs[i])


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
    for bag in cdgmae.find_bags(root):
        real, views = cdgmae.bag_files(Path(root) / bag)
        if views:
            bags.append((real, views))
    if not bags:
        raise ValueError(f"{root}: no bag with a real.* image and generated views")
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
        raise FileNotFoundError(f"{root}: video folder not found")
    if frame_gap < 1:
        raise ValueError(f"--frame-gap {frame_gap}: must be at least 1")
    candidates = []
    for seq in sorted(d for d in frames_root.iterdir() if d.is_dir()):
        frames = sorted(f for f in seq.iterdir() if f.suffix.lower() in cdgmae.IMAGE_SUFFIXES)
        candidates += [(frames[t], frames[t + frame_gap]) for t in range(len(frames) - frame_gap)]
    if not candidates:
        raise ValueError(f"{frames_root}: no sequence has more than {frame_gap} frames")
    return [candidates[i] for i in rng.choice(len(candidates), min(num_pairs, len(candidates)), replace=False)]


def list_image_files(root):
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    paths = sorted(Path(d) / f for d, _, files in os.walk(root) for f in files
                   if not f.startswith(".") and f.lower().endswith(cdgmae.IMAGE_SUFFIXES))
    if len(paths) < 2:
        raise ValueError(f"{root}: needs at least two images, found {len(paths)}")
    return paths


def random_pairs(paths, num_pairs, rng):
    """Pairs of two different images drawn uniformly."""
    pairs = []
    for _ in range(num_pairs):
        i, j = rng.choice(len(paths), 2, replace=False)
        pairs.append((paths[i], paths[j]))
    return pairs


def knn_pairs_from_features(cls, queries, k, rng):
    """For each query index, one of its k nearest neighbours (cosine similarity of cls [N, D],
    the query itself excluded) at random: a list of (query, neighbour) index pairs."""
    if cls.shape[0] <= k:
        raise ValueError(f"k-NN with k = {k} needs more than {k} images, got {cls.shape[0]}")
    feats = F.normalize(cls.float(), dim=-1)
    queries = torch.as_tensor(np.asarray(queries), dtype=torch.long)
    sim = feats[queries] @ feats.T                                   # [Q, N]
    sim[torch.arange(len(queries)), queries] = -float("inf")
    neighbours = sim.topk(k, dim=-1).indices                         # [Q, k]
    pick = torch.as_tensor(rng.integers(k, size=len(queries)))
    return [(int(q), int(neighbours[r, pick[r]])) for r, q in enumerate(queries)]


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

def format_table(rows):
    """Rows {"pairs", "num_pairs", "gs", "ls", "nps", ...} in the form of Table 1."""
    lines = [f"{'Views':<22}{'Global Sim. (up)':>18}{'Local Sim. (down)':>19}{'Nearest Patch Sim. (up)':>25}"
             f"{'pairs':>7}{'paper GS/LS/NPS':>22}"]
    for r in rows:
        paper = PAPER_TABLE1.get(r["pairs"])
        ref = "/".join(f"{v:.3f}" for v in paper) if paper else "-"
        lines.append(f"{r['pairs']:<22}{r['gs']:>18.3f}{r['ls']:>19.3f}{r['nps']:>25.3f}{r['num_pairs']:>7}{ref:>22}")
    return "\n".join(lines)


def write_csv(rows, path):
    fields = ["pairs", "num_pairs", "gs", "gs_std", "ls", "ls_std", "nps", "nps_std"]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in fields})
    cdgmae.atomic_write(path, write)


def summarize(name, scores):
    row = {"pairs": name, "num_pairs": len(scores["gs"])}
    for k, v in scores.items():
        row[k], row[f"{k}_std"] = v.mean().item(), (v.std().item() if len(v) > 1 else 0.0)
    return row


def get_args_parser():
    p = argparse.ArgumentParser(
        description="GS / LS / NPS (CDG-MAE Eq. 1-3) of pair sets, printed as in Table 1 and written to a CSV. "
                    "Give any of --video, --bags, --images (the last gives the k-NN and random rows).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="ViT checkpoint for f_* and f_i (paper: MAE ViT-B/16)")
    p.add_argument("--video", default=None, help="DAVIS-layout folder (JPEGImages/480p/<seq>/*.jpg): frame pairs")
    p.add_argument("--frame-gap", type=int, default=10, help="frames between the two frames of a video pair")
    p.add_argument("--bags", nargs="*", default=[], help="bag roots (generate_views.py output): real vs view pairs")
    p.add_argument("--bag-names", nargs="*", default=None, help="row names of the --bags roots; unset: "
                                                                "'Diffusion (S-LDM)' for one root")
    p.add_argument("--images", default=None, help="image folder (e.g. ImageNet train): k-NN and random pairs")
    p.add_argument("--knn", type=int, default=5, help="k of the k-NN pairs")
    p.add_argument("--knn-pool", type=int, default=10000, help="images drawn from --images for the k-NN search")
    p.add_argument("--num-pairs", type=int, default=500, help="pairs per set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--center-crop", action=argparse.BooleanOptionalAction, default=True,
                   help="resize the shorter side and centre-crop (else resize the whole image to a square)")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default=None, help="torch device; unset: cuda if available, else cpu")
    p.add_argument("--csv", default="view_metrics.csv", help="where to write the table")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not (args.video or args.bags or args.images):
        raise SystemExit("nothing to evaluate: give --video, --bags and/or --images")
    names = args.bag_names or (["Diffusion (S-LDM)"] if len(args.bags) == 1 else
                               [f"Diffusion ({Path(b).name})" for b in args.bags])
    if len(names) != len(args.bags):
        raise SystemExit(f"--bag-names: {len(names)} names for {len(args.bags)} --bags roots")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vit = cdgmae.encoder_from_checkpoint(args.checkpoint, img_size=args.input_size).to(device).eval()

    # Every pair set is drawn before any feature is computed, so that bad input fails fast.
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
        queries = knn_rng.choice(len(pool), min(args.num_pairs, len(pool)), replace=False)
        pair_sets.append(("K-nn images", (pool, queries, knn_rng)))
        pair_sets.append(("Random images", random_pairs(paths, args.num_pairs, rng(3))))

    common = dict(size=args.input_size, center_crop=args.center_crop, batch_size=args.batch_size,
                  workers=args.workers, device=device)
    rows = []
    for name, pairs in pair_sets:
        if name == "K-nn images":
            pool, queries, knn_rng = pairs
            cls = cls_features(vit, pool, **common)
            pairs = [(pool[i], pool[j]) for i, j in knn_pairs_from_features(cls, queries, args.knn, knn_rng)]
        rows.append(summarize(name, evaluate_pairs(vit, pairs, desc=name, **common)))
    print(format_table(rows))
    write_csv(rows, args.csv)
    print(f"wrote {args.csv}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
