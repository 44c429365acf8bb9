"""The whole CDG-MAE pipeline on the built-in toy world, on 2 CPU cores in minutes.

Nothing can be downloaded on a fresh machine, so the demo draws its own world (toyworld.py),
where the true correspondences are known, and runs every stage of the paper on it with the
project's own code -- only the configuration is small:

  1. toy bags of views (the "real" scene + 4 views in which objects move, turn and change
     pose under new lighting, Sec. 3.1) and toy DAVIS / VIP / JHMDB videos in their native
     layouts (toyworld.py);
  2. CDG-MAE pre-training on the bags (cdgmae.py: a small ViT with 8-pixel patches on 64x64
     crops instead of ViT-S/16 on 224x224; Eq. 4-10 unchanged);
  3. training-free label propagation (propagate.py, Table 7's protocol) and the scores
     (evaluate.py) for three feature extractors: the trained encoder, the same encoder at
     its random initialisation, and raw pixels;
  4. the view-consistency metrics GS / LS / NPS (metrics.py, Eq. 1-3) of toy view pairs,
     video frame pairs and random pairs, with the trained encoder, in the form of Table 1.

It prints one table and saves a reconstruction picture and propagation strips. Every stage
is resumable: a rerun skips what is done.

    python demo.py                          # everything, 7-8 minutes on 2 cores
    python demo.py --anchors 3 --anchor-mask 0.25 --output runs/demo-a3
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import cdgmae
import evaluate
import metrics
import propagate
import toyworld

# The toy configuration: the paper's method and code, at a size that trains on 2 CPU cores.
# Bags are 64x64 (objects of 3-6 patches of 8 pixels); video frames 96x160 (a 12x20 grid).
TOY_MODEL = dict(embed_dim=96, depth=3, num_heads=4, patch_size=8, input_size=64,
                 decoder_dim=96, decoder_depth=2, decoder_heads=4, decoder_ffn_dim=384)
VIDEO_SIZE = {"davis": (96, 160), "vip": (96, 160), "jhmdb": (96, 128)}


class RawPixels(nn.Module):
    """Raw pixels as features: each P x P patch of the (ImageNet-normalised) frame, flattened.
    It has the interface propagate.py uses (patch_size, forward_features)."""

    def __init__(self, patch_size=8):
        super().__init__()
        self.patch_size, self.embed_dim, self.depth, self.num_heads = patch_size, 3 * patch_size ** 2, 0, 0

    def forward_features(self, x):  # [B, 3, H, W] -> [B, 1 + h*w, 3*P*P] (a zero row in the cls slot)
        B, C, H, W = x.shape
        P = self.patch_size
        patches = x.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // P) * (W // P), -1)
        return torch.cat([torch.zeros_like(patches[:, :1]), patches], dim=1)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/demo", help="folder for the toy world, the run and the results")
    p.add_argument("--seed", type=cdgmae.checked(int, 0), default=0, help="seeds the toy world and the training run")
    g = p.add_argument_group("toy world")
    g.add_argument("--num-bags", type=cdgmae.checked(int, 1), default=2000, help="bags of 1 real + 4 views, 64x64")
    g.add_argument("--davis-videos", type=cdgmae.checked(int, 1), default=40, help="toy DAVIS videos (96x160, 20 frames)")
    g.add_argument("--vip-videos", type=cdgmae.checked(int, 1), default=10, help="toy VIP videos (96x160, 20 frames)")
    g.add_argument("--jhmdb-videos", type=cdgmae.checked(int, 1), default=10, help="toy JHMDB videos (96x128, 20 frames)")
    g = p.add_argument_group("pre-training (cdgmae.py; the model size is TOY_MODEL)")
    g.add_argument("--anchors", type=cdgmae.checked(int, 1, 4), default=1, help="N anchors, 1..4: a bag holds 5 images (paper: 1 for a1, 3 for a3)")
    g.add_argument("--anchor-mask", type=cdgmae.checked(float, 0, 1, high_open=True), default=0.0, help="anchor mask ratio r_a (paper: 0 / 0.25)")
    g.add_argument("--epochs", type=cdgmae.checked(int, 1), default=26, help="passes over the bags")
    g.add_argument("--batch-size", type=cdgmae.checked(int, 1), default=64)
    g.add_argument("--lr", type=cdgmae.checked(float, 0, low_open=True), default=2e-3, help="peak learning rate (blr 8e-3 at batch 64)")
    g.add_argument("--warmup-epochs", type=cdgmae.checked(float, 0), default=1)
    g.add_argument("--workers", type=cdgmae.checked(int, 0), default=0, help="DataLoader workers (0: decode in the training process)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--datasets", nargs="+", default=["davis", "vip", "jhmdb"], choices=["davis", "vip", "jhmdb"])
    g.add_argument("--metric-pairs", type=cdgmae.checked(int, 1), default=200, help="pairs per set for GS / LS / NPS")
    g.add_argument("--threads", type=cdgmae.checked(int, 1), default=None, help="torch CPU threads (default: torch's)")
    return p


def make_world(root, args):
    """Step 1: bags and videos (each file is skipped if it exists)."""
    toyworld.write_bags(root / "bags", args.num_bags, 4, 64, args.seed, progress=False)
    videos = {"davis": (toyworld.write_davis, args.davis_videos), "vip": (toyworld.write_vip, args.vip_videos),
              "jhmdb": (toyworld.write_jhmdb, args.jhmdb_videos)}
    for name in args.datasets:
        write, count = videos[name]
        height, width = VIDEO_SIZE[name]
        write(root / name, count, 20, height, width, args.seed, progress=False)


def training_argv(root, run, args):
    m = TOY_MODEL
    return ["--data", str(root / "bags"), "--output", str(run), "--seed", str(args.seed),
            "--embed-dim", str(m["embed_dim"]), "--depth", str(m["depth"]), "--num-heads", str(m["num_heads"]),
            "--patch-size", str(m["patch_size"]), "--input-size", str(m["input_size"]),
            "--decoder-dim", str(m["decoder_dim"]), "--decoder-depth", str(m["decoder_depth"]),
            "--decoder-heads", str(m["decoder_heads"]), "--decoder-ffn-dim", str(m["decoder_ffn_dim"]),
            "--anchors", str(args.anchors), "--anchor-mask", str(args.anchor_mask),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--warmup-epochs", str(args.warmup_epochs), "--workers", str(args.workers),
            "--vis-every", str(args.epochs), "--save-every", str(args.epochs), "--log-every", "10",
            "--resume", "auto"]


def initial_encoder(run):
    """The trained encoder's exact starting point: the weights the trainer saved before its
    first step (checkpoint-0000.pth)."""
    path = Path(run) / "checkpoint-0000.pth"
    if not path.is_file():
        raise SystemExit(f"{path}: no initial checkpoint (this run folder predates it; use another --output)")
    return cdgmae.encoder_from_checkpoint(path).eval()


def score(features, root, out, datasets, visualize=False):
    """Step 3: label propagation and the paper's scores on every toy dataset."""
    scores = {}
    for name in datasets:
        pred = out / name
        propagate.propagate_dataset(name, root / name, features, pred, input_size=VIDEO_SIZE[name],
                                    device="cpu", visualize=visualize, visualize_frames=5, progress=False)
        summary = evaluate.evaluate_dataset(name, root / name, pred, progress=False)
        scores[name] = {k: v for k, v in summary.items() if isinstance(v, float)}
    return scores


def view_consistency(encoder, root, num_pairs, seed):
    """Step 4: GS / LS / NPS (Eq. 1-3) of toy view pairs, video frame pairs and random pairs."""
    rng = np.random.default_rng(seed)
    reals = [cdgmae.bag_files(root / "bags" / b)[0] for b in cdgmae.find_bags(root / "bags")]
    sets = {"Video frames (toy DAVIS, 5 frames apart)": metrics.video_pairs(root / "davis" / "JPEGImages" / "480p", num_pairs, 5, rng),
            "Generated views (toy bag: real vs view)": metrics.bag_pairs(root / "bags", num_pairs, rng),
            "Random images (toy real scenes)": metrics.random_pairs(reals, num_pairs, rng)}
    size = encoder.img_size
    return {name: {k: float(v.mean()) for k, v in metrics.evaluate_pairs(encoder, pairs, size=size, workers=0,
                                                                        desc=name).items()}
            for name, pairs in sets.items()}


def format_results(results):
    rows = [("features", "DAVIS J&F", "J", "F", "VIP mIoU", "JHMDB PCK@0.1", "PCK@0.2")]
    for name in ("trained", "random init", "raw pixels"):
        s = results["scores"][name]
        d, v, j = s.get("davis", {}), s.get("vip", {}), s.get("jhmdb", {})
        cell = lambda table, key: f"{table[key]:.1f}" if key in table else "-"  # noqa: E731
        label = {"trained": "CDG-MAE (trained)", "random init": "same ViT, random init", "raw pixels": "raw pixels"}[name]
        rows.append((label, cell(d, "J&F_m"), cell(d, "J_m"), cell(d, "F_m"), cell(v, "mIoU"),
                     cell(j, "PCK@0.1"), cell(j, "PCK@0.2")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines += ["", "View consistency, trained encoder (the form of Table 1)",
              f"{'pairs':44s} {'GS':>6s} {'LS':>6s} {'NPS':>6s}"]
    for name, m in results["view_metrics"].items():
        lines.append(f"{name:44s} {m['gs']:6.3f} {m['ls']:6.3f} {m['nps']:6.3f}")
    return "\n".join(lines)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    root, run = out / "toy", out / "train"
    start = time.time()

    print(f"[1/4] toy world -> {root}")
    make_world(root, args)
    print(f"      {time.time() - start:.0f} s")

    print(f"[2/4] CDG-MAE pre-training (N={args.anchors}, r_a={args.anchor_mask:g}) -> {run}")
    t = time.time()
    cdgmae.main(training_argv(root, run, args))
    train_seconds = time.time() - t
    checkpoint = run / "checkpoint-last.pth"

    print("[3/4] label propagation and scores")
    feature_sets = {"trained": cdgmae.encoder_from_checkpoint(checkpoint).eval(),
                    "random init": initial_encoder(run), "raw pixels": RawPixels(TOY_MODEL["patch_size"])}
    scores = {name: score(features, root, out / "predictions" / name.replace(" ", "_"), args.datasets,
                          visualize=name == "trained")
              for name, features in feature_sets.items()}

    print("[4/4] view-consistency metrics")
    view = view_consistency(feature_sets["trained"], root, args.metric_pairs, args.seed)

    results = {"seed": args.seed, "anchors": args.anchors, "anchor_mask": args.anchor_mask,
               "epochs": args.epochs, "train_seconds": train_seconds, "total_seconds": time.time() - start,
               "scores": scores, "view_metrics": view}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    pictures = sorted(run.glob("reconstruction-*.png"))[-1:] + sorted((out / "predictions" / "trained").glob("*/visualize/*.png"))[:2]
    print()
    print(f"Toy world, seed {args.seed}: {args.num_bags} bags, N={args.anchors}, r_a={args.anchor_mask:g}, "
          f"{args.epochs} epochs ({train_seconds / 60:.1f} min of training, {(time.time() - start) / 60:.1f} min in all)")
    print(format_results(results))
    print(f"\nresults: {out / 'results.json'}; pictures: " + ", ".join(str(p) for p in pictures))
    return results


if __name__ == "__main__":
    main()
