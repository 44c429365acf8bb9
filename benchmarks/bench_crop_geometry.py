"""Aspect ratios of the training crops of bags whose real image is not square (Table 6: crop
aspect ratio in (0.75, 1.33)), with one box per sample (a) as the same fractions of every
image, drawn on the target's size, and (b) drawn on the bag's common square geometry and
mapped into each image's conditioning region (`cdgmae.BagDataset.geometry`, `image_boxes`).

It writes synthetic ImageNet-shaped bags into a temporary folder (a 500x375 real image and
four 256x256 views; flat images: only their sizes matter), draws one sample per bag for a1
(N = 1) and a3 (N = 3) with the dataset's own generator, and counts the crops whose aspect
ratio, in pixels of the image they are cut from, is outside (0.75, 1.33), for the real image
and for the views. (a) is computed here from the same draws; (b) is what the dataset returns
(its --decode gpu items carry each image's box). "beyond rounding": outside the range by more
than the 1.2% that whole-pixel boxes can move an aspect ratio (tests/test_bag_geometry.py).

    python benchmarks/bench_crop_geometry.py                    # 300 bags of 500x375
    python benchmarks/bench_crop_geometry.py --bags 500 --real-size 375 500
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import cdgmae  # noqa: E402

RATIO = (0.75, 1.33)   # Table 6
ROUNDING = 1.012       # the most whole-pixel boxes on a 256 square and a 224 region move an aspect ratio


def write_bags(root, num_bags, real_size, view_size=256, views=4):
    for i in range(num_bags):
        bag = root / f"n{i % 10:02d}" / f"img{i:05d}"
        bag.mkdir(parents=True)
        Image.new("RGB", real_size, (90, 120, 150)).save(bag / "real.jpeg")
        for k in range(views):
            Image.new("RGB", (view_size, view_size), (90, 120, 150)).save(bag / f"view_{k:02d}.jpg")
    return common.find_bags(root)


def aspect(box, size):
    l, t, r, b = box
    return (r - l) * size[0] / ((b - t) * size[1])


def measure(root, bags, num_anchors, epochs, seed=0):
    """[(rule, kind, drawn on the real image, aspect ratio)] of every crop of one sample per bag and
    epoch; kind is "real" or "view"."""
    ds = cdgmae.BagDataset(root, bags, 4, num_anchors=num_anchors, crop_ratio=RATIO, seed=seed, encoded=True)
    rows = []
    for epoch, index in [(epoch, index) for epoch in range(epochs) for index in range(len(bags))]:
        rng = np.random.default_rng([seed, epoch, index])
        chosen = ds.files(bags[index], rng)
        sizes = [cdgmae.read_encoded(p)[1] for p in chosen]
        target_is_real = common.is_real_image(chosen[0])
        # (a) the box drawn on the target's size, the same fractions of every image
        shared = cdgmae.sample_crop_box(rng, *sizes[0], ds.crop_scale, ds.crop_ratio)
        # (b) the dataset's item (same draws): each image's box
        boxes = ds[(epoch, index)][1].tolist()
        for path, size, box in zip(chosen, sizes, boxes):
            kind = "real" if common.is_real_image(path) else "view"
            rows.append(("shared fractions", kind, target_is_real, aspect(shared, size)))
            rows.append(("common geometry", kind, target_is_real, aspect(box, size)))
    return rows


def outside(aspects, slack=1.0):
    return f"{np.mean([not RATIO[0] / slack < a < RATIO[1] * slack for a in aspects]):.1%}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bags", type=common.checked(int, 1), default=300)
    p.add_argument("--epochs", type=common.checked(int, 1), default=4, help="samples per bag")
    p.add_argument("--real-size", type=common.checked(int, 1), nargs=2, default=(500, 375), help="width height")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bags = write_bags(Path(tmp), args.bags, tuple(args.real_size))
        print(f"{args.bags} bags x {args.epochs} samples, real {args.real_size[0]}x{args.real_size[1]}, views 256x256: "
              f"the crops whose aspect ratio is outside {RATIO} (in parentheses: beyond rounding) / crops")
        columns = [("real", None, "real-image crops"), ("view", None, "view crops"),
                   ("real", False, "real crops, box on a view"), ("view", True, "view crops, box on the real")]
        print("| setting | rule | " + " | ".join(title for _, _, title in columns) + " |")
        print("|---" * (2 + len(columns)) + "|")
        for name, anchors in (("a1", 1), ("a3", 3)):
            rows = measure(Path(tmp), bags, anchors, args.epochs)
            for rule in ("shared fractions", "common geometry"):
                cells = []
                for kind, drawn_on_real, _ in columns:
                    x = [a for r, k, d, a in rows if r == rule and k == kind and drawn_on_real in (None, d)]
                    cells.append(f"{outside(x)} ({outside(x, ROUNDING)}) / {len(x)}")
                print(f"| {name} | {rule} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
