"""The training data path: uint8 crops of whole-pixel boxes, resampled with Pillow's filters; the same
pixels from the CPU and the device decode paths, normalisation on the device equal to the
previous float path, persistent workers that resume at the right sample, a start-up scan split
over ranks and processes and cached in the output folder."""
import argparse
import io
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import cdgmae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--decoder-dim", "32", "--decoder-depth", "1",
        "--decoder-heads", "2", "--decoder-ffn-dim", "64", "--patch-size", "8", "--input-size", "32",
        "--workers", "0", "--log-every", "1", "--vis-every", "0"]


def natural(rng, width, height):
    """Smooth structure at several scales plus sensor noise: an image with photo-like gradients."""
    img = torch.zeros(1, 3, height, width)
    for cells, amplitude in [(4, 60), (16, 30), (64, 15)]:
        img += amplitude * F.interpolate(torch.from_numpy(rng.normal(size=(1, 3, cells, cells)).astype(np.float32)),
                                         size=(height, width), mode="bicubic", align_corners=False)
    img += 128 + torch.from_numpy(rng.normal(0, 3, size=(1, 3, height, width)).astype(np.float32))
    return img[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy()


def whole_pixels(box, width, height):
    """A fractional box (l, t, r, b) in whole pixels, as crop_resize (and RandomResizedCrop) cuts it."""
    return round(box[0] * width), round(box[1] * height), round(box[2] * width), round(box[3] * height)


def pil_crop(array, box, size):
    """Pillow's crop of the box's whole pixels, resized with Pillow's bicubic filter."""
    h, w = array.shape[:2]
    return np.asarray(Image.fromarray(array).crop(whole_pixels(box, w, h)).resize((size, size), Image.BICUBIC))


# torch's uint8 kernel resamples in two passes (rows, then columns), each with fixed-point weights of >= 15
# bits (<= 10 taps x 2^-15 x 255 < 0.08 level) and a rounding to uint8 after the first pass (0.5 level, which
# the second pass's weights, of L1 norm <= 1.25, carry as <= 0.625), then the final rounding (0.5): a pixel
# lies within 0.5 + 0.625 + 0.08 < 1.25 level of the exact (float64) resize. Pillow's uint8 resize is built
# the same way, so the two lie within 2.5, i.e. 2 whole levels, of each other.
UINT8_BOUND = 1.25


@pytest.mark.float_kernels
def test_crop_resize_is_the_antialiased_resize_of_the_boxs_whole_pixels():
    rng = np.random.default_rng(0)
    for trial in range(24):
        size = (500, 375) if trial % 2 else (256, 256)
        # levels 40..215: the bicubic overshoot (< 10% of the local range) never reaches 0 or 255, where both
        # kernels clamp their first pass and the exact resize would not, which UINT8_BOUND does not cover
        array = (40 + natural(rng, *size) * (175 / 255)).round().astype(np.uint8)
        # boxes drawn on either image size: whole pixels on one, between pixels on the other
        box = cdgmae.sample_crop_box(rng, *[(500, 375), (256, 256)][trial % 3 % 2], (0.3, 1.0))
        ours = cdgmae.crop_resize(torch.from_numpy(array.copy()).permute(2, 0, 1), box, 224)
        assert ours.dtype == torch.uint8 and ours.shape == (3, 224, 224)
        l, t, r, b = whole_pixels(box, *size)
        exact = F.interpolate(torch.from_numpy(array.copy()).permute(2, 0, 1)[None, :, t:b, l:r].double(),
                              size=(224, 224), mode="bicubic", antialias=True, align_corners=False)[0]
        assert (ours.double() - exact).abs().max() <= UINT8_BOUND
        # Pillow's filter (bicubic, a = -0.5) on the same pixels: the same resize up to the two roundings
        assert np.abs(ours.permute(1, 2, 0).numpy().astype(int) - pil_crop(array, box, 224)).max() <= 2


@pytest.mark.float_kernels
def test_float_kernel_of_the_device_path_gives_the_uint8_kernels_pixels():
    rng = np.random.default_rng(2)
    image = torch.from_numpy(natural(rng, 320, 240).copy()).permute(2, 0, 1)
    for _ in range(5):
        box = cdgmae.sample_crop_box(rng, 256, 256)
        a = cdgmae.crop_resize(image, box, 64).int()
        b = cdgmae.crop_resize(image, box, 64, float_math=True).int()
        # the float32 kernel is within 0.5 level + float32 rounding (< 0.01) of the exact resize, the uint8
        # kernel within UINT8_BOUND: together < 1.76, i.e. at most 1 whole level apart
        assert (a - b).abs().max() <= 1


@pytest.mark.float_kernels
def test_normalisation_on_the_device_is_the_previous_float_arithmetic_bit_for_bit():
    array = natural(np.random.default_rng(3), 40, 30)
    mean = torch.tensor(cdgmae.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(cdgmae.IMAGENET_STD).view(3, 1, 1)
    ours = cdgmae.normalize(torch.from_numpy(array.copy()).permute(2, 0, 1)[None], mean, std)[0]
    assert torch.equal(ours, cdgmae.image_to_tensor(Image.fromarray(array)))


def write_bags(root, num_bags=6, views=3, real_size=(60, 80), view_size=(48, 48), fmt="JPEG"):
    rng = np.random.default_rng(4)
    for i in range(num_bags):
        bag = root / f"class{i % 2}" / f"img{i:03d}"
        bag.mkdir(parents=True)
        Image.fromarray(natural(rng, real_size[1], real_size[0])).save(bag / "real.jpg", quality=90)
        for k in range(views):
            Image.fromarray(natural(rng, *view_size)).save(bag / f"view_{k:02d}.jpg", quality=95)
    return root, common.find_bags(root)


def pil_decode(blobs, device):
    """Stand-in for nvJPEG in tests: Pillow decodes the bytes on the CPU."""
    return [torch.from_numpy(np.array(Image.open(io.BytesIO(b.numpy().tobytes())).convert("RGB"))).permute(2, 0, 1)
            .to(device) for b in blobs]


def test_device_decode_path_gives_the_cpu_paths_batch(tmp_path):
    root, bags = write_bags(tmp_path / "bags")
    cpu = cdgmae.BagDataset(root, bags, 3, num_anchors=2, input_size=32, num_patches=16, seed=5)
    encoded = cdgmae.BagDataset(root, bags, 3, num_anchors=2, input_size=32, num_patches=16, seed=5, encoded=True)
    keys = [(1, i) for i in range(len(bags))]
    expected = torch.utils.data.default_collate([cpu[k] for k in keys])
    batch = cdgmae.collate_encoded([encoded[k] for k in keys])
    # The batch carries every file of every sample, byte for byte and in order, in one tensor.
    files = cdgmae.encoded_files(batch[0], batch[1])
    assert [f.numpy().tobytes() for f in files] == [b.numpy().tobytes() for k in keys for b in encoded[k][0]]
    got = cdgmae.assemble_on_device(batch, 32, torch.device("cpu"), decode=pil_decode)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)  # same bytes, same boxes, flips and noise, same crop code


LOW_FILE_LIMIT = """
import resource, sys
import torch
import cdgmae
import common
# 128 open files per process, fewer than the 160 files of one batch below.
resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
root = sys.argv[1]
ds = cdgmae.BagDataset(root, common.find_bags(root), 3, num_anchors=3, input_size=16, num_patches=4, encoded=True)
sampler = cdgmae.GlobalBatchSampler(len(ds), 40, 0, 1)
loader = torch.utils.data.DataLoader(ds, batch_size=40, sampler=sampler, num_workers=2,
                                     collate_fn=cdgmae.collate_encoded)
for epoch in range(2):
    sampler.set_epoch(epoch)
    for batch in loader:
        expected = cdgmae.collate_encoded([ds[key] for key in sampler])  # one batch per epoch: all 40 bags
        assert all(torch.equal(a, b) for a, b in zip(batch, expected))
print("delivered")
"""


def test_encoded_batches_reach_the_main_process_within_a_low_open_file_limit(tmp_path):
    """--decode gpu: 40 samples x 4 files per batch come from two DataLoader workers to the main
    process under a limit of 128 open files: the files travel as one tensor, not one tensor each."""
    import signal
    import subprocess
    import sys
    root, _ = write_bags(tmp_path / "bags", num_bags=40)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", LOW_FILE_LIMIT, str(root)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # the loader stalled: end it and its workers
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
    assert process.returncode == 0 and out.strip() == "delivered", err[-2000:]


def test_uint8_samples_keep_the_documented_random_choices(tmp_path):
    """(seed, epoch, index) -> target/anchor choice, then the box (on the views' 48 x 48), the flip
    and the masking noise, drawn in this order; each image is cut with the box mapped into its
    conditioning region, and the crops are Pillow's crops of those boxes' whole pixels."""
    root, bags = write_bags(tmp_path / "bags", num_bags=2)  # real 80 x 60, views 48 x 48
    # 60 -> 224 makes 80 -> 298.67, rounded 299, whose centre 224 starts at 37; a square view is all region
    regions = {(80, 60): (37 / 299, 0, 261 / 299, 1), (48, 48): (0, 0, 1, 1)}
    ds = cdgmae.BagDataset(root, bags, 3, num_anchors=2, input_size=32, num_patches=16, seed=7)
    for epoch in range(4):
        rng = np.random.default_rng([7, epoch, 1])
        target = int(rng.integers(0, 4))
        anchors = rng.choice([i for i in range(4) if i != target], size=2, replace=False)
        real, views = common.bag_files(root / bags[1])
        arrays = [np.asarray(Image.open(p).convert("RGB")) for p in [[real, *views][i] for i in [target, *anchors]]]
        box = cdgmae.sample_crop_box(rng, 48, 48)
        flip = rng.random() < 0.5
        noise = rng.random(16, dtype=np.float32)
        got_target, got_anchors, got_noise, _ = ds[(epoch, 1)]
        assert np.array_equal(got_noise.numpy(), noise)
        for ours, array in zip([got_target, *got_anchors], arrays):
            l, t, r, b = regions[array.shape[1], array.shape[0]]
            image_box = (l + box[0] * (r - l), t + box[1] * (b - t), l + box[2] * (r - l), t + box[3] * (b - t))
            crop = pil_crop(array, image_box, 32).astype(int)
            theirs, mirrored = (crop[:, ::-1], crop) if flip else (crop, crop[:, ::-1])
            ours = ours.permute(1, 2, 0).numpy().astype(int)
            assert np.abs(ours - theirs).max() <= 2 < np.abs(ours - mirrored).max()  # 2: see UINT8_BOUND


class KeyDataset(torch.utils.data.Dataset):
    """Returns its key and the worker's process id."""

    def __len__(self):
        return 24

    def __getitem__(self, key):
        return torch.tensor(key), os.getpid()


def test_persistent_workers_serve_every_epoch_and_a_resume_starts_at_the_right_sample():
    sampler = cdgmae.GlobalBatchSampler(24, 8, rank=1, world_size=2, seed=3)
    args = argparse.Namespace(workers=2, decode="cpu")
    loader = cdgmae.make_loader(args, KeyDataset(), sampler, 4, torch.device("cpu"))
    assert loader.persistent_workers and loader.prefetch_factor == 8
    pids, seen = set(), {}
    for epoch, first in [(0, 0), (1, 1), (2, 2)]:  # epoch 1 resumed after its first global batch
        sampler.set_epoch(epoch, first)
        seen[epoch] = []
        for keys, pid in loader:
            seen[epoch] += keys.tolist()
            pids.update(pid.tolist())
    assert len(pids) == 2  # the same two workers all along
    for epoch, first in [(0, 0), (1, 1), (2, 2)]:
        order = torch.randperm(24, generator=torch.Generator().manual_seed(3 * 100_003 + epoch)).tolist()
        expected = [[epoch, i] for step in range(first, 3) for i in order[step * 8 + 4:step * 8 + 8]]  # rank 1's half
        assert seen[epoch] == expected


def test_prefetch_depth_follows_the_batch_size():
    args = argparse.Namespace(workers=1, decode="cpu")
    depth = {b: cdgmae.make_loader(args, KeyDataset(), None, b, torch.device("cpu")).prefetch_factor
             for b in (1, 64, 128, 256, 1024)}
    assert depth == {1: 8, 64: 4, 128: 2, 256: 2, 1024: 2}  # about 256 samples in flight per worker, at least 2 batches


def test_listing_and_checking_split_over_ranks_and_processes_cover_every_bag_once(tmp_path):
    root, bags = write_bags(tmp_path / "bags", num_bags=9)
    (root / "class1" / "img003" / "view_01.jpg").write_bytes(b"\xff\xd8 broken")
    shares = [common.find_bags(root, rank, 3, processes=2) for rank in range(3)]
    assert sorted(b for share in shares for b in share) == bags and sum(map(len, shares)) == len(bags)
    jobs = [(str(root), bag, 3, 3, "decode", None) for bag in bags]
    in_process = [common.bag_problem(job) for job in jobs]
    assert common.parallel_map(common.bag_problem, jobs, processes=2, chunksize=2) == in_process
    assert [bag for bag, why in in_process if why] == ["class1/img003"]


def test_the_bag_index_is_cached_in_the_output_and_a_changed_folder_is_rescanned(tmp_path, monkeypatch):
    root, _ = write_bags(tmp_path / "bags", num_bags=8)
    argv = ["--data", str(root), "--output", str(tmp_path / "run"), "--batch-size", "4", "--epochs", "2",
            "--anchors", "2", *TINY]
    cdgmae.main([*argv, "--max-steps", "1"])
    assert (tmp_path / "run" / "bag-index.json").exists()
    calls = []
    real_check = cdgmae.check_bags
    monkeypatch.setattr(cdgmae, "check_bags", lambda *a, **k: calls.append(a) or real_check(*a, **k))
    cdgmae.main([*argv, "--max-steps", "2", "--resume", "auto"])
    assert calls == []  # nothing rescanned
    write_bags(tmp_path / "more")
    (tmp_path / "more" / "class0" / "img000").rename(root / "class0" / "img100")  # a bag is added
    with pytest.raises(SystemExit, match="the bag list: 8 bags, sha1 [0-9a-f]+ -> 9 bags"):
        cdgmae.main([*argv, "--resume", "auto"])
    assert len(calls) == 1  # rescanned, and the resume on another bag list refused


def test_gpu_decode_without_a_cuda_device_is_one_line(tmp_path):
    root, _ = write_bags(tmp_path / "bags", num_bags=4)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="^--decode gpu: needs a CUDA device"):
        cdgmae.main(["--data", str(root), "--output", str(tmp_path / "run"), "--decode", "gpu", *TINY])
    assert not (tmp_path / "run").exists()


def test_decoding_gives_pillows_rgb_pixels_for_every_mode(tmp_path):
    array = natural(np.random.default_rng(6), 40, 30)
    files = {"rgb.jpg": Image.fromarray(array), "gray.jpg": Image.fromarray(array).convert("L"),
             "cmyk.jpg": Image.fromarray(array).convert("CMYK"), "rgba.png": Image.fromarray(array).convert("RGBA"),
             "palette.png": Image.fromarray(array).convert("P"), "rgb.png": Image.fromarray(array)}
    for name, image in files.items():
        image.save(tmp_path / name)
        pixels = cdgmae.decode_image(tmp_path / name)
        assert pixels.shape == (3, 30, 40) and pixels.dtype == torch.uint8
        expected = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        assert np.array_equal(pixels.permute(1, 2, 0).numpy(), expected), name
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "rgb.jpg").read_bytes()[:600])  # truncated: the header parses
    with pytest.raises(common.UnreadableImage, match="cut.jpg: cannot decode image"):
        cdgmae.decode_image(tmp_path / "cut.jpg")


def test_a_bag_with_a_broken_image_is_replaced_by_the_same_bag_in_the_loader_and_in_the_dataset(tmp_path):
    root, bags = write_bags(tmp_path / "bags", num_bags=6)
    for image in (root / bags[2]).iterdir():  # whichever images a sample of bag 2 draws, it cannot be cut
        image.write_bytes(b"\xff\xd8 broken")
    ds = cdgmae.BagDataset(root, bags, 3, num_anchors=2, input_size=24, num_patches=9, seed=3)
    sampler = cdgmae.GlobalBatchSampler(6, 3, rank=0, world_size=1, epoch=0, seed=3)
    loader = cdgmae.make_loader(argparse.Namespace(workers=2, decode="cpu"), ds, sampler, 3, torch.device("cpu"))
    keys = list(sampler)
    for step, batch in enumerate(loader):
        expected = torch.utils.data.default_collate([ds[key] for key in keys[step * 3:step * 3 + 3]])
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(batch, expected))
    substitute = next(i for i, key in enumerate(keys) if key[1] == 2)  # bag 2's sample is bag 3's, drawn alike
    rng = np.random.default_rng([3, 0, 2, 1])
    assert torch.equal(ds[keys[substitute]][0], ds.sample(bags[3], rng)[0])


def test_loader_workers_deliver_the_items_batch_by_batch(tmp_path):
    root, bags = write_bags(tmp_path / "bags", num_bags=8)
    ds = cdgmae.BagDataset(root, bags, 3, num_anchors=1, input_size=16, num_patches=4, seed=2)
    sampler = cdgmae.GlobalBatchSampler(8, 4, rank=0, world_size=1, epoch=1, seed=2)
    loader = cdgmae.make_loader(argparse.Namespace(workers=2, decode="cpu"), ds, sampler, 4, torch.device("cpu"))
    keys = list(sampler)
    for step, batch in enumerate(loader):
        expected = torch.utils.data.default_collate([ds[key] for key in keys[step * 4:step * 4 + 4]])
        assert all(torch.equal(a, b) for a, b in zip(batch, expected))
    assert step == 1
