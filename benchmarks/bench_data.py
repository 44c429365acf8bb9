"""CPU cost of the training data path per sample, by stage, next to a bare decode of the same JPEGs.

It writes synthetic ImageNet-shaped bags into a temporary folder (a 500x375 photo-like real
image at JPEG quality 90, about 110 KB, and four 256x256 views at quality 95), then, in one
thread of one process, times for the a1 (N = 1) and a3 (N = 3) settings:

  before  the previous loader: PIL decode + convert, PIL bicubic crop-resize (box), PIL flip,
          float32 ImageNet normalisation in the worker, float32 collate into shared memory;
  after   cdgmae.BagDataset.collated, what a DataLoader worker runs for a batch: Pillow decodes
          into a uint8 RGBX array (`cdgmae.decode_rgbx`), torch's uint8 antialiased bicubic
          crop-resize (`cdgmae.crop_resize`), each crop copied (and flipped) straight into its
          row of a uint8 batch in shared memory; normalisation on the device;
  bare    Image.open + load of exactly the files each sample decodes.

Stages are timed on a copy of the dataset's steps (checked to give the dataset's own batch);
the "measured" rows time `dataset.collated(keys, shared=True)` itself. It also reports how far
the new crops are from the previous PIL crops (same boxes). The machine may be shared: compare
ratios to the bare decode, which is measured in the same passes.

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
STAGES = ["decode", "crop + resize", "to uint8 / normalise", "rest", "collate (shared memory)"]
# "collate" after: allocating the batch in shared memory and copying each crop (flipped) into it.


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


def chosen_paths(ds, key):
    """The files one sample decodes, and its generator after the view choice (the dataset's order)."""
    epoch, index = key
    rng = np.random.default_rng([ds.seed, epoch, index])
    real, views = common.bag_files(ds.root / ds.bags[index])
    paths = [real] + views[:ds.num_views]
    return [paths[i] for i in ds.choose_views(rng)], rng


def draw_rest(ds, rng, paths, sizes):
    """Each image's box (one box on the bag's common geometry, mapped), the flip and the noise."""
    (width, height), regions = ds.geometry(paths, sizes)
    box = cdgmae.sample_crop_box(rng, width, height, ds.crop_scale, ds.crop_ratio)
    flip = rng.random() < 0.5
    target_noise = torch.from_numpy(rng.random(ds.num_patches, dtype=np.float32))
    anchor_noise = torch.from_numpy(rng.random((ds.num_anchors, ds.num_patches), dtype=np.float32))
    return cdgmae.image_boxes(box, regions), flip, target_noise, anchor_noise


def staged_after(ds, keys, clock):
    """cdgmae.BagDataset.collated(keys, shared=True) (CPU decode), stage by stage."""
    size, n = ds.input_size, ds.num_anchors
    with clock("collate (shared memory)"):
        target = cdgmae.batch_tensor((len(keys), 3, size, size), torch.uint8, True)
        anchors = cdgmae.batch_tensor((len(keys), n, 3, size, size), torch.uint8, True)
        target_noise = cdgmae.batch_tensor((len(keys), ds.num_patches), torch.float32, True)
        anchor_noise = cdgmae.batch_tensor((len(keys), n, ds.num_patches), torch.float32, True)
    with clock("rest"):  # the files of every item first, as `collated` lists them
        chosen = [chosen_paths(ds, key) for key in keys]
    for i, (paths, rng) in enumerate(chosen):
        with clock("decode"):
            images = [cdgmae.decode_rgbx(path) for path in paths]
        with clock("rest"):
            boxes, flip, target_noise[i], anchor_noise[i] = draw_rest(
                ds, rng, paths, [(image.shape[2], image.shape[1]) for image in images])
        for out, image, box in zip([target[i], *anchors[i]], images, boxes):
            with clock("crop + resize"):
                crop = cdgmae.crop_resize(image, box, size)[:3]
            with clock("collate (shared memory)"):
                cdgmae.copy_flipped(out, crop, flip)
    return target, anchors, target_noise, anchor_noise


def staged_before(ds, key, clock, keep_pixels=None):
    """The previous loader (PIL crop-resize, float32 normalisation in the worker), stage by stage."""
    with clock("rest"):
        paths, rng = chosen_paths(ds, key)
    with clock("decode"):
        images = [common.load_rgb(p) for p in paths]
    with clock("rest"):
        boxes, flip, target_noise, anchor_noise = draw_rest(ds, rng, paths, [img.size for img in images])
    crops = []
    for img, box in zip(images, boxes):
        with clock("crop + resize"):
            w, h = img.size
            img = img.resize((ds.input_size, ds.input_size), Image.BICUBIC,
                             box=(box[0] * w, box[1] * h, box[2] * w, box[3] * h))
            if flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if keep_pixels is not None:
            keep_pixels.append(np.asarray(img))
        with clock("to uint8 / normalise"):
            crops.append(cdgmae.image_to_tensor(img))
    with clock("rest"):
        return crops[0], torch.stack(crops[1:]), target_noise, anchor_noise


def collate_shared(samples):
    """What a DataLoader worker's default_collate does: stack each field into new shared memory."""
    return [torch.stack(field, out=cdgmae.batch_tensor((len(field), *field[0].shape), field[0].dtype, True))
            for field in zip(*samples)]


def bare_decode(paths):
    for path in paths:
        with Image.open(path) as im:
            im.load()


def one_pass(ds, keys, batch):
    """Per-sample seconds of every stage, before and after, the measured dataset, and bare decode."""
    before, after, measured = Clock(), Clock(), Clock()
    for start in range(0, len(keys), batch):
        chunk = keys[start:start + batch]
        with measured("bare decode"):
            for key in chunk:
                bare_decode(chosen_paths(ds, key)[0])
        old = [staged_before(ds, key, before) for key in chunk]
        with before("collate (shared memory)"):
            collate_shared(old)
        staged_after(ds, chunk, after)
        with measured("batch"):
            ds.collated(chunk, shared=True)
    n = len(keys)
    return ({k: v / n for k, v in before.seconds.items()}, {k: v / n for k, v in after.seconds.items()},
            {k: v / n for k, v in measured.seconds.items()})


def pixel_difference(ds, keys):
    """New crops against the previous PIL crops of the same boxes, (mean |diff|, max, share > 2
    levels) for the views (the box is drawn on their size: whole pixels) and for the real images
    (the box mapped into the conditioning region falls between pixels)."""
    diffs = {"views": [], "real images": []}
    for key in keys:
        pil = []
        staged_before(ds, key, Clock(), keep_pixels=pil)
        target, anchors, _, _ = ds[key]
        for i, (ours, theirs) in enumerate(zip([target, *anchors], pil)):
            d = np.abs(ours.permute(1, 2, 0).numpy().astype(int) - theirs.astype(int)).ravel()
            diffs["real images" if common.is_real_image(chosen_paths(ds, key)[0][i]) else "views"].append(d)
    return {k: (np.concatenate(v).mean(), np.concatenate(v).max(), (np.concatenate(v) > 2).mean())
            for k, v in diffs.items() if v}


def measure(setting, root, bags, args):
    ds = cdgmae.BagDataset(root, bags, 4, SETTINGS[setting], 224, num_patches=196, seed=0)
    keys = [(0, i) for i in range(len(bags))]
    # the staged copy is the dataset's own computation, which is default_collate of its items
    expected = torch.utils.data.default_collate([ds[key] for key in keys[:8]])
    assert all(torch.equal(a, b) for a, b in zip(staged_after(ds, keys[:8], Clock()), expected))
    assert all(torch.equal(a, b) for a, b in zip(ds.collated(keys[:8], shared=True), expected))
    passes = [one_pass(ds, keys, args.batch) for _ in range(args.passes)]
    before, after, measured = min(passes, key=lambda p: p[2]["batch"])
    return before, after, measured, pixel_difference(ds, keys[:args.pixel_samples])


def report(results):
    ms = lambda s: f"{s * 1e3:.2f}"  # noqa: E731
    names = list(results)
    print("\n| stage (CPU ms per sample, 1 thread) | " + " | ".join(f"{n} before | {n} after" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for stage in STAGES:
        print(f"| {stage} | " + " | ".join(f"{ms(results[n][0].get(stage, 0))} | {ms(results[n][1].get(stage, 0))}"
                                          for n in names) + " |")
    for label, row in [("total", lambda b, a, m: (sum(b.values()), sum(a.values()))),
                       ("bare decode of the same JPEGs", lambda b, a, m: (m["bare decode"], m["bare decode"])),
                       ("total / bare decode", lambda b, a, m: (sum(b.values()) / m["bare decode"],
                                                                m["batch"] / m["bare decode"]))]:
        cells = [row(*results[n][:3]) for n in names]
        fmt = (lambda x: f"{x:.2f}x") if "/" in label else ms
        print(f"| {label} | " + " | ".join(f"{fmt(b)} | {fmt(a)}" for b, a in cells) + " |")
    print("| measured: dataset.collated(keys), the batch in shared memory | " + " | ".join(
        f"- | {ms(results[n][2]['batch'])}" for n in names) + " |")
    print("| samples/s per core | " + " | ".join(
        f"{1 / sum(results[n][0].values()):.0f} | {1 / (results[n][2]['batch']):.0f}"
        for n in names) + " |")
    if "a3" in results:
        b, _, m = results["a3"][:3]
        old, new = sum(b.values()), m["batch"]
        print(f"\ncores per GPU, a3: {317 * old:.1f} before / {317 * new:.1f} after for 317 samples/s (the paper's "
              f"pace); {4000 * old:.0f} before / {4000 * new:.0f} after for 4,000 samples/s")
    for n in names:
        for group, (mean, worst, share) in results[n][3].items():
            print(f"{n}, {group}: new crops vs the previous PIL crops of the same boxes: mean |diff| {mean:.3f} "
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
