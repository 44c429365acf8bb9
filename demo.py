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

    python demo.py                          # everything, about 8 minutes on one CPU core
    python demo.py --anchors 3 --anchor-mask 0.25 --output runs/demo-a3
    python demo.py --compare                # Tables 5, 2 and 4 in miniature (docs/comparisons.md)

`--compare` trains the same toy model on the pretext data of the family -- crops of one image
(CropMAE), toy video frames (SiamMAE), k-NN images, generated views with one anchor and with
three masked anchors (CDG-MAE-a1, -a3) -- for the same number of steps on each of 3 seeds, and
prints the paper's tables in their form with a bar chart. It takes about 40 minutes a seed on
2 cores and resumes where it stopped.

What you may copy: `RawPixels` (a patch-pixel feature extractor with the interface
propagate.py uses; torch only) and `draw_comparison` (a bar chart with Pillow only). The rest
is glue over the project's scripts: it needs cdgmae.py, toyworld.py, propagate.py,
evaluate.py, metrics.py and generate_views.py beside it.
"""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw

import cdgmae
from common import atomic_write, bag_files, check_output_folder, checked, find_bags, run_command
import evaluate
import generate_views
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
    p.add_argument("--output", default=None, help="folder for the toy world, the run and the results "
                                                 "(default: runs/demo, with --compare runs/compare)")
    p.add_argument("--seed", type=checked(int, 0, cdgmae.SEED_MAX), default=0,
                   help="seeds the toy world and the training run")
    g = p.add_argument_group("toy world")
    g.add_argument("--num-bags", type=checked(int, 1), default=2000, help="bags of 1 real + 4 views, 64x64")
    g.add_argument("--davis-videos", type=checked(int, 1), default=40, help="toy DAVIS videos (96x160, 20 frames)")
    g.add_argument("--vip-videos", type=checked(int, 1), default=10, help="toy VIP videos (96x160, 20 frames)")
    g.add_argument("--jhmdb-videos", type=checked(int, 1), default=10, help="toy JHMDB videos (96x128, 20 frames)")
    g = p.add_argument_group("pre-training (cdgmae.py; the model size is TOY_MODEL)")
    g.add_argument("--anchors", type=checked(int, 1, 4), default=1, help="N anchors, 1..4: a bag holds 5 images (paper: 1 for a1, 3 for a3)")
    g.add_argument("--anchor-mask", type=checked(float, 0, 1, high_open=True), default=0.0, help="anchor mask ratio r_a (paper: 0 / 0.25)")
    g.add_argument("--epochs", type=checked(int, 1), default=26, help="passes over the bags")
    g.add_argument("--batch-size", type=checked(int, 1), default=64)
    g.add_argument("--lr", type=checked(float, 0, low_open=True), default=2e-3, help="peak learning rate (blr 8e-3 at batch 64)")
    g.add_argument("--warmup-epochs", type=checked(float, 0), default=1)
    g.add_argument("--workers", type=checked(int, 0), default=0, help="DataLoader workers (0: decode in the training process)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--datasets", nargs="+", default=["davis", "vip", "jhmdb"], choices=["davis", "vip", "jhmdb"])
    g.add_argument("--metric-pairs", type=checked(int, 1), default=200, help="pairs per set for GS / LS / NPS")
    g.add_argument("--threads", type=checked(int, 1, os.cpu_count() or 1), default=None,
                   help="torch CPU threads, at most the CPUs here (default: torch's)")
    g = p.add_argument_group("the paper's comparisons in miniature (--compare; see docs/comparisons.md)")
    g.add_argument("--compare", action="store_true",
                   help="train the same encoder on every pretext data of --methods for every seed of --seeds and "
                        "print Tables 5, 2 and 4 in miniature (output: runs/compare unless --output)")
    g.add_argument("--seeds", type=checked(int, 0, cdgmae.SEED_MAX), nargs="+", default=[0, 1, 2],
                   help="--compare: seeds")
    g.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="--compare: pretexts")
    g.add_argument("--train-videos", type=checked(int, 1), default=256,
                   help="--compare: unlabelled toy videos of 20 frames for the SiamMAE pretext (never evaluated ones)")
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


def training_argv(root, run, args, data="bags", extra=()):
    """cdgmae.py's command line for the toy model, trained on root/<data>; `extra` flags come last
    (argparse keeps the last value of a flag given twice)."""
    m = TOY_MODEL
    return [f"--data={root / data}", f"--output={run}", "--seed", str(args.seed),  # =: a path may start with "-"
            "--embed-dim", str(m["embed_dim"]), "--depth", str(m["depth"]), "--num-heads", str(m["num_heads"]),
            "--patch-size", str(m["patch_size"]), "--input-size", str(m["input_size"]),
            "--decoder-dim", str(m["decoder_dim"]), "--decoder-depth", str(m["decoder_depth"]),
            "--decoder-heads", str(m["decoder_heads"]), "--decoder-ffn-dim", str(m["decoder_ffn_dim"]),
            "--anchors", str(args.anchors), "--anchor-mask", str(args.anchor_mask),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--warmup-epochs", str(args.warmup_epochs), "--workers", str(args.workers),
            "--vis-every", str(args.epochs), "--save-every", str(args.epochs), "--log-every", "10",
            "--resume", "auto", *extra]


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
    reals = [bag_files(root / "bags" / b)[0] for b in find_bags(root / "bags")]
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


# -----------------------------------------------------------------------------
# The paper's comparisons in miniature (--compare): Tables 5, 2 and 4 on the toy world
# -----------------------------------------------------------------------------

# The same toy ViT and trainer on the pretext data of the family (cdgmae.py --pretext):
# name -> (row label, --pretext, training data under the seed's toy world, N, r_a, r_t).
# Every method takes as many optimizer steps as the bags' run (--epochs passes over --num-bags).
# r_t: the pretexts' own ratios, kept as a share of the 8x8 = 64 target patches: CropMAE's 98.5%
# keeps 2 of 196 patches, which at 64 patches would keep none, so 97.5% (1 patch) stands in;
# SiamMAE's 95% keeps 3 of 64 (9 of 196); CDG-MAE's 90% keeps 6 (19 of 196).
METHODS = {
    "cropmae": ("CropMAE (crops of one image)", "crops", "images", 1, 0.0, 0.975),
    "siammae": ("SiamMAE (toy video frames)", "frames", "videos", 1, 0.0, 0.95),
    "knn": ("k-NN images (k = 5)", "bags", "knn_bags", 1, 0.0, 0.9),
    "a1": ("CDG-MAE-a1 (generated views)", "bags", "bags", 1, 0.0, 0.9),
    "a3": ("CDG-MAE-a3 (N = 3, r_a = 0.25)", "bags", "bags", 3, 0.25, 0.9),
}
BASELINES = {"random init": "same ViT, random init", "raw pixels": "raw pixels"}
SHORT = {"cropmae": "CropMAE", "siammae": "SiamMAE", "knn": "k-NN images", "a1": "CDG-MAE-a1", "a3": "CDG-MAE-a3",
         "random init": "random init", "raw pixels": "raw pixels"}
# The k-NN embedding: the paper uses MAE's ViT-B/16, trained on ImageNet itself; here the encoder
# that the CropMAE pretext trained on the same toy images (no generated view) stands in for it.
KNN_ENCODER = "cropmae"


def compare_settings(args):
    """What the comparison's numbers depend on; a rerun into the same folder must match it."""
    return {"num_bags": args.num_bags, "davis_videos": args.davis_videos, "vip_videos": args.vip_videos,
            "jhmdb_videos": args.jhmdb_videos, "train_videos": args.train_videos, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "warmup_epochs": args.warmup_epochs,
            "datasets": sorted(args.datasets), "model": TOY_MODEL}


def claim_compare_folder(out, settings):
    """Records the settings in out/compare.json, or refuses a folder made with other ones."""
    record = out / "compare.json"
    if record.exists():
        stored = json.loads(record.read_text())
        changed = [k for k in settings if stored.get(k) != settings[k]]
        if changed:
            raise SystemExit(f"{record}: this comparison was made with other settings ({', '.join(changed)}) "
                             "(pass the same flags, or another --output)")
        return
    out.mkdir(parents=True, exist_ok=True)
    save_json(record, settings)


def make_training_data(root, args, methods):
    """The pretexts' data beside the bags: the bags' real images as a plain folder (CropMAE),
    unlabelled toy videos that are not evaluated (SiamMAE)."""
    if "cropmae" in methods or "knn" in methods:
        for bag in find_bags(root / "bags"):
            link = root / "images" / f"{bag}.jpg"
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                source = root / "bags" / bag / "real.jpg"  # a hard link, else a copy; renamed into place
                atomic_write(link, lambda tmp, source=source: generate_views.place_file(source, tmp, link=True))
    if "siammae" in methods:
        toyworld.write_videos(root / "videos", args.train_videos, 20, *VIDEO_SIZE["davis"], args.seed, progress=False)


def make_knn_bags(root, checkpoint, args):
    """Table 2's k-NN bags: each toy image with its 5 nearest other toy images by the cls
    embedding of `checkpoint` (generate_views.py knn, resumable)."""
    generate_views.knn_command([f"--images={root / 'images'}", f"--checkpoint={checkpoint}",
                                f"--output={root / 'knn_bags'}", "--input-size", str(TOY_MODEL["input_size"]),
                                "--workers", "0", "--device", "cpu", "--no-progress"])


def method_argv(name, root, run, args):
    """cdgmae.py's command line for one method: its pretext, data, anchors and target mask, and
    the epochs that give it the bags' number of optimizer steps."""
    _, pretext, data, anchors, anchor_mask, target_mask = METHODS[name]
    items = args.train_videos if pretext == "frames" else args.num_bags
    steps_per_epoch = max(1, items // args.batch_size)
    steps = args.epochs * max(1, args.num_bags // args.batch_size)
    epochs = -(-steps // steps_per_epoch)
    warmup = args.warmup_epochs * epochs / args.epochs
    extra = ["--pretext", pretext, "--anchors", str(anchors), "--anchor-mask", str(anchor_mask),
             "--target-mask", str(target_mask), "--epochs", str(epochs), "--warmup-epochs", f"{warmup:g}",
             "--vis-every", str(epochs), "--save-every", str(epochs)]
    return training_argv(root, run, args, data, extra)


def save_json(path, value):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=1)))


def compare_seed(args, seed_dir, methods):
    """Every method of one seed: world, training, propagation, scores; each result is saved in
    seed_dir/<method>/results.json and skipped on a rerun."""
    root = seed_dir / "toy"
    make_world(root, args)
    make_training_data(root, args, methods)
    order = sorted(methods, key=lambda m: m != KNN_ENCODER)  # the k-NN encoder trains first
    for name in order:
        result = seed_dir / name / "results.json"
        if result.exists():
            continue
        run = seed_dir / name / "train"
        if name == "knn":
            make_knn_bags(root, seed_dir / KNN_ENCODER / "train" / "checkpoint-last.pth", args)
        print(f"seed {args.seed}, {METHODS[name][0]}")
        start = time.time()
        cdgmae.main(method_argv(name, root, run, args))
        seconds = time.time() - start
        encoder = cdgmae.encoder_from_checkpoint(run / "checkpoint-last.pth").eval()
        scores = score(encoder, root, seed_dir / name / "predictions", args.datasets)
        save_json(result, {"method": name, "seed": args.seed, "train_seconds": seconds, "scores": scores})
    result = seed_dir / "baselines.json"
    if not result.exists():
        run = seed_dir / order[0] / "train"  # every method starts from these weights (same seed, same model)
        scores = {name: score(features, root, seed_dir / "baselines" / name.replace(" ", "_"), args.datasets)
                  for name, features in (("random init", initial_encoder(run)),
                                         ("raw pixels", RawPixels(TOY_MODEL["patch_size"])))}
        save_json(result, {"seed": args.seed, "scores": scores})


def collect(out, seeds, methods):
    """{row: {dataset: {metric: [value per seed]}}} for the methods and the two baselines."""
    table = {}
    for seed in seeds:
        seed_dir = out / f"seed-{seed}"
        rows = {name: json.loads((seed_dir / name / "results.json").read_text())["scores"] for name in methods}
        rows.update(json.loads((seed_dir / "baselines.json").read_text())["scores"])
        for row, scores in rows.items():
            for dataset, values in scores.items():
                for metric, value in values.items():
                    table.setdefault(row, {}).setdefault(dataset, {}).setdefault(metric, []).append(value)
    return table


COLUMNS = [("davis", "J&F_m", "DAVIS J&F"), ("davis", "J_m", "J"), ("davis", "F_m", "F"),
           ("vip", "mIoU", "VIP mIoU"), ("jhmdb", "PCK@0.1", "PCK@0.1"), ("jhmdb", "PCK@0.2", "PCK@0.2")]


def mean_sd(values):
    """'m ± sd' (sample standard deviation over the seeds), or 'm' for one seed."""
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.1f}" + (f" ± {values.std(ddof=1):.1f}" if len(values) > 1 else "")


def text_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "-" * len(line(header))] + [line(r) for r in rows])


def format_comparison(table, methods, seeds):
    """Table 5 (all methods), Table 2 (the anchor/target data at N = 1) and Table 4 (a1 vs a3)."""
    labels = {**{m: METHODS[m][0] for m in methods}, **BASELINES}
    cell = lambda row, d, k: mean_sd(table[row][d][k]) if d in table.get(row, {}) else "-"  # noqa: E731
    five = [[labels[r]] + [cell(r, d, k) for d, k, _ in COLUMNS] for r in list(methods) + list(BASELINES)]
    parts = [f"Table 5 in miniature (toy world, mean ± sd over seeds {', '.join(map(str, seeds))})",
             text_table(["method"] + [c for _, _, c in COLUMNS], five)]
    two = [[labels[r], cell(r, "davis", "J&F_m"), cell(r, "vip", "mIoU"), cell(r, "jhmdb", "PCK@0.1")]
           for r in ("a1", "knn", "cropmae", "siammae") if r in methods]
    if len(two) > 1:
        parts += ["", "Table 2 in miniature (N = 1: where the anchor and the target come from)",
                  text_table(["pretext data", "DAVIS J&F", "VIP mIoU", "PCK@0.1"], two)]
    if "a1" in methods and "a3" in methods and "davis" in table["a1"]:
        four = [[f"{METHODS[r][3]}", f"{METHODS[r][4]:g}", cell(r, "davis", "J&F_m"), cell(r, "vip", "mIoU"),
                 cell(r, "jhmdb", "PCK@0.1")] for r in ("a1", "a3")]
        diff = np.asarray(table["a3"]["davis"]["J&F_m"]) - np.asarray(table["a1"]["davis"]["J&F_m"])
        parts += ["", "Table 4 in miniature (multiple anchors and anchor masking)",
                  text_table(["N", "r_a", "DAVIS J&F", "VIP mIoU", "PCK@0.1"], four),
                  "a3 - a1, DAVIS J&F per seed: " + ", ".join(f"{d:+.1f}" for d in diff)]
    return "\n".join(parts)


def draw_comparison(table, rows, path, panels=(("davis", "J&F_m", "DAVIS J&F"), ("vip", "mIoU", "VIP mIoU"),
                                                ("jhmdb", "PCK@0.1", "JHMDB PCK@0.1"))):
    """A bar chart (Pillow only) of rows [(key in table, label)]: one panel per benchmark, a bar
    per row at the mean over the seeds, a dot per seed; bars start 5 points below the lowest value."""
    colours = [(70, 110, 180), (90, 160, 90), (200, 150, 60), (200, 80, 70), (140, 80, 170), (150, 150, 150),
               (100, 100, 100)]
    bar, gap, top, bottom, width = 26, 10, 30, 100, 240
    height = top + len(rows) * (bar + gap) + 20
    image = Image.new("RGB", (bottom + width * len(panels) + 20, height), "white")
    draw = ImageDraw.Draw(image)
    for i, (_, label) in enumerate(rows):
        draw.text((6, top + i * (bar + gap) + bar // 2 - 5), label[:24], fill="black")
    for p, (dataset, key, title) in enumerate(panels):
        x0 = bottom + p * width
        values = [v for row, _ in rows for v in table.get(row, {}).get(dataset, {}).get(key, [])]
        if not values:
            continue
        low, high = min(values) - 5, max(values) + 2
        scale = (width - 40) / (high - low)
        draw.text((x0, 8), title, fill="black")
        for i, (row, _) in enumerate(rows):
            seeds = table.get(row, {}).get(dataset, {}).get(key, [])
            if not seeds:
                continue
            y = top + i * (bar + gap)
            draw.rectangle([x0, y, x0 + (np.mean(seeds) - low) * scale, y + bar], fill=colours[i % len(colours)])
            for v in seeds:
                cx = x0 + (v - low) * scale
                draw.ellipse([cx - 3, y + bar // 2 - 3, cx + 3, y + bar // 2 + 3], fill="black")
            end = x0 + (max(max(seeds), np.mean(seeds)) - low) * scale
            draw.text((end + 6, y + bar // 2 - 5), f"{np.mean(seeds):.1f}", fill="black")
    image.save(path)


def compare(args):
    """--compare: every method of --methods on every seed of --seeds; prints the tables, saves
    out/comparison.json, out/comparison.txt and the picture out/comparison.png."""
    out = Path(args.output or "runs/compare")
    methods = [m for m in METHODS if m in args.methods]
    if "knn" in methods and KNN_ENCODER not in methods:
        methods.insert(0, KNN_ENCODER)  # the k-NN bags need its encoder
    claim_compare_folder(out, compare_settings(args))
    start = time.time()
    for seed in args.seeds:
        args.seed = seed
        compare_seed(args, out / f"seed-{seed}", methods)
    table = collect(out, args.seeds, methods)
    text = format_comparison(table, methods, args.seeds)
    save_json(out / "comparison.json", {"seeds": args.seeds, "methods": methods, "table": table})
    atomic_write(out / "comparison.txt", lambda tmp: Path(tmp).write_text(text + "\n"))
    draw_comparison(table, [(row, SHORT[row]) for row in methods + list(BASELINES)], out / "comparison.png")
    print(f"\n{text}\n\n({(time.time() - start) / 60:.1f} min; {out / 'comparison.txt'}, {out / 'comparison.png'})")
    return table


def check_args(parser, args):
    """Flags that contradict each other are one argparse line (exit 2), and an --output that cannot
    be a folder one line, before the toy world is drawn."""
    if args.batch_size > args.num_bags:
        parser.error(f"argument --batch-size: {args.batch_size} is more than --num-bags {args.num_bags} "
                     f"(a training step takes one batch of bags)")
    if args.compare and "siammae" in args.methods and args.batch_size > args.train_videos:
        parser.error(f"argument --batch-size: {args.batch_size} is more than --train-videos {args.train_videos} "
                     f"(SiamMAE's step takes one batch of videos)")
    if args.compare and "knn" in args.methods and args.num_bags <= generate_views.PAPER_KNN:
        parser.error(f"argument --num-bags: {args.num_bags} images hold no {generate_views.PAPER_KNN} other "
                     f"images for the k-NN bags (give more than {generate_views.PAPER_KNN})")
    try:
        check_output_folder(args.output or ("runs/compare" if args.compare else "runs/demo"))
    except ValueError as e:
        raise SystemExit(str(e)) from None


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        return compare(args)
    out = Path(args.output or "runs/demo")
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
    save_json(out / "results.json", results)
    pictures = sorted(run.glob("reconstruction-*.png"))[-1:] + sorted((out / "predictions" / "trained").glob("*/visualize/*.png"))[:2]
    print()
    print(f"Toy world, seed {args.seed}: {args.num_bags} bags, N={args.anchors}, r_a={args.anchor_mask:g}, "
          f"{args.epochs} epochs ({train_seconds / 60:.1f} min of training, {(time.time() - start) / 60:.1f} min in all)")
    print(format_results(results))
    print(f"\nresults: {out / 'results.json'}; pictures: " + ", ".join(str(p) for p in pictures))
    return results


if __name__ == "__main__":
    run_command(main)
