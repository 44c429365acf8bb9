"""CPU cost of the training data path per sample, by stage, next to a bare decode of the same JPEGs.

It writes synthetic ImageNet-shaped bags into a temporary folder (a 500x375 photo-like real
image at JPEG quality 90, about 110 KB, and four 256x256 views at quality 95), then, in one
thread of one process (what one DataLoader worker gets), times for the a1 (N = 1) and a3 (N = 3)
settings:

  loader  what a DataLoader worker runs for a batch: `cdgmae.BagDataset`'s items (Pillow decodes,
          torch's uint8 antialiased bicubic crop-resize of each image's whole-pixel box, one flip)
          and their collation into shared memory; stage by stage and measured whole;
  bare    Image.open + load of exactly the files each sample decodes.

The machine may be shared: compare the ratio to the bare decode, which is measured in the same
passes (CPU time of this thread, which another process's load disturbs little). It also reports
how far the crops are from those of Pillow's box resize at the box's exact (sub-pixel) place,
which the loader used before its boxes were cut in whole pixels.

    python benchmarks/bench_data.py                      # 200 bags, a1 and a3, 3 passes
    python benchmarks/bench_data.py --bags 100 --passes 1 --settings a3
"""
import argparse
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import cdgmae  # noqa: E402

SETTINGS = {"a1": 1, "a3": 3}  # N anchors
STAGES = ["decode", "crop + resize + flip", "draws (views, box, noise)", "collate (shared memory)"]


def photo(rng, width, height):
    """Photo-like content: a 1/f sum of smooth random fields (correlated channels) plus sensor noise."""
    img = torch.zeros(1, 3, height, width)
    for cells, amplitude in [(4, 60), (8, 40), (16, 28), (32, 20), (64, 16), (128, 14), (256, 28)]:
        field = (0.4 * torch.from_numpy(rng.normal(size=(1, 3, cells, cells)).astype(np.float32))
                 + torch.from_numpy(rng.normal(size=(1, 1, cells, cells)).astype(np.float32)))
        img += amplitude * F.interpolate(field, size=(height, width), mode="bicubic", align_corners=False)
    img += 120 + torch.from_numpy(rng.normal(0, 10, size=(1, 3, height, width)).astype(np.float32))
    return Image.fromarray(img[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy())


def write_bags(root, count, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        bag = root / f"n{i % 10:08d}" / f"img_{i:05d}"
        bag.mkdir(parents=True)
        photo(rng, 500, 375).save(bag / "real.jpg", quality=90)
        for k in range(4):
            photo(rng, 256, 256).save(bag / f"view_{k:02d}.jpg", quality=95)
    return common.find_bags(root)


class Clock:
    def __init__(self):
        self.seconds = defaultdict(float)

    @contextmanager
    def __call__(self, stage):
        start = time.thread_time()  # CPU time of this thread: what a worker's core spends, even on a busy machine
        yield
        self.seconds[stage] += time.thread_time() - start


def draws(ds, key):
    """A sample's files, its boxes (one box on the bag's geometry, mapped into each image) and flip,
    drawn as BagDataset.sample draws them (the images' sizes from their headers)."""
    epoch, index = key
    rng = np.random.default_rng([ds.seed, epoch, index])
    files = ds.files(ds.bags[index], rng)
    sizes = []
    for path in files:
        with Image.open(path) as im:
            sizes.append(im.size)
    (width, height), regions = ds.geometry(files, sizes)
    box = cdgmae.sample_crop_box(rng, width, height, ds.crop_scale, ds.crop_ratio)
    flip = rng.random() < 0.5
    ds.draw_noise(rng)
    return files, cdgmae.image_boxes(box, regions), flip


def collate_shared(samples):
    """What a DataLoader worker's default_collate does: stack each field into one new tensor (in a
    worker its storage is allocated in shared memory, where the main process maps it: one copy)."""
    return [torch.stack(field) for field in zip(*samples)]


def one_pass(ds, keys, batch):
    """Per-sample CPU seconds of every stage, of the dataset's own batches, and of the bare decode."""
    staged, measured = Clock(), Clock()
    for start in range(0, len(keys), batch):
        chunk = keys[start:start + batch]
        samples = []
        for key in chunk:
            with staged("draws (views, box, noise)"):
                files, boxes, flip = draws(ds, key)
            with staged("decode"):
                images = [cdgmae.decode_image(path) for path in files]
            with staged("crop + resize + flip"):
                crops = cdgmae.crop_views(images, boxes, flip, ds.input_size)
            samples.append((crops[0], crops[1:]))
            with measured("bare decode"):
                for path in files:
                    with Image.open(path) as im:
                        im.load()
        with staged("collate (shared memory)"):
            collate_shared(samples)
        with measured("loader"):
            collate_shared([ds[key] for key in chunk])
    return {k: v / len(keys) for k, v in staged.seconds.items()}, {k: v / len(keys) for k, v in measured.seconds.items()}


def pixel_difference(ds, keys):
    """The crops against Pillow's box resize at the box's exact place (the loader's crops before the
    boxes were cut in whole pixels): (mean |diff|, max, share > 2 levels), for the views (the box is
    drawn on their size: whole pixels, so only the resampling at the crop's edge differs) and for the
    real images (the box mapped into the conditioning region falls between pixels)."""
    diffs = {"views": [], "real images": []}
    for key in keys:
        files, boxes, flip = draws(ds, key)
        target, anchors, _, _ = ds[key]
        for path, box, ours in zip(files, boxes, [target, *anchors]):
            image = common.load_rgb(path)
            w, h = image.size
            theirs = image.resize((ds.input_size,) * 2, Image.BICUBIC, box=(box[0] * w, box[1] * h, box[2] * w, box[3] * h))
            theirs = np.asarray(theirs.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else theirs).astype(int)
            d = np.abs(ours.permute(1, 2, 0).numpy().astype(int) - theirs).ravel()
            diffs["real images" if common.is_real_image(path) else "views"].append(d)
    return {k: (np.concatenate(v).mean(), np.concatenate(v).max(), (np.concatenate(v) > 2).mean())
            for k, v in diffs.items() if v}


def measure(setting, root, bags, args):
    ds = cdgmae.BagDataset(root, bags, 4, SETTINGS[setting], 224, num_patches=196, seed=0)
    keys = [(0, i) for i in range(len(bags))]
    passes = [one_pass(ds, keys, args.batch) for _ in range(args.passes)]
    staged, measured = min(passes, key=lambda p: p[1]["loader"])
    return staged, measured, pixel_difference(ds, keys[:args.pixel_samples])


def report(results):
    ms = lambda s: f"{s * 1e3:.2f}"  # noqa: E731
    names = list(results)
    print("\n| CPU ms per sample, 1 thread | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for stage in STAGES:
        print(f"| {stage} | " + " | ".join(ms(results[n][0].get(stage, 0)) for n in names) + " |")
    print("| loader, measured whole (items + collate) | " + " | ".join(ms(results[n][1]["loader"]) for n in names) + " |")
    print("| bare decode of the same JPEGs | " + " | ".join(ms(results[n][1]["bare decode"]) for n in names) + " |")
    print("| loader / bare decode | " + " | ".join(
        f"{results[n][1]['loader'] / results[n][1]['bare decode']:.2f}x" for n in names) + " |")
    print("| samples/s per core | " + " | ".join(f"{1 / results[n][1]['loader']:.0f}" for n in names) + " |")
    if "a3" in results:
        per_sample = results["a3"][1]["loader"]
        print(f"\ncores per GPU, a3: {317 * per_sample:.1f} for 317 samples/s (the paper's pace); "
              f"{4000 * per_sample:.0f} for 4,000 samples/s")
    for n in names:
        for group, (mean, worst, share) in results[n][2].items():
            print(f"{n}, {group}: crops vs Pillow's box resize at the box's exact place: mean |diff| {mean:.3f} "
                  f"levels, max {worst}, {share:.2%} of values differ by more than 2")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bags", type=common.checked(int, 8), default=200, help="synthetic bags to write")
    p.add_argument("--passes", type=common.checked(int, 1), default=3, help="timed passes (the fastest is kept)")
    p.add_argument("--batch", type=common.checked(int, 1), default=64, help="samples per collated batch")
    p.add_argument("--pixel-samples", type=common.checked(int, 1), default=40, help="samples for the pixel comparison")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = p.parse_args()
    torch.set_num_threads(1)  # one core: what one DataLoader worker gets
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "bags"
        bags = write_bags(root, args.bags)
        real_kb = np.mean([(root / b / "real.jpg").stat().st_size for b in bags]) / 1e3
        view_kb = np.mean([(root / b / "view_00.jpg").stat().st_size for b in bags]) / 1e3
        print(f"{len(bags)} bags: real 500x375 q90 {real_kb:.0f} KB, views 256x256 q95 {view_kb:.0f} KB; "
              f"torch {torch.__version__}, Pillow {Image.__version__}, {args.passes} pass(es), best kept")
        report({s: measure(s, root, bags, args) for s in args.settings})


if __name__ == "__main__":
    main()
