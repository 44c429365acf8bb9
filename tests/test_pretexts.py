"""The family's other pretext data (issue 12): CropMAE's crops (--pretext crops: the anchor a
global random resized crop, the target a crop of that crop) and SiamMAE's video frames
(--pretext frames: the target 4 to 48 frames after its anchor, one box and flip for both),
read by the same model and trainer as the bags of views."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import common
import cdgmae

TINY = ["--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--decoder-dim", "32", "--decoder-depth", "1",
        "--decoder-heads", "2", "--decoder-ffn-dim", "64", "--patch-size", "8", "--input-size", "32",
        "--workers", "0", "--log-every", "1", "--vis-every", "0"]
W, H = 240, 200  # the ramp image: red = x, green = y (both < 256)


def ramp(blue=0):
    """An image whose pixel (y, x) is (x, y, blue): its values are its coordinates."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x, y, np.full_like(x, blue)], -1).astype(np.uint8)


def write_images(root, count=4):
    for i in range(count):
        folder = root / f"n0{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ramp(blue=10 * i)).save(folder / f"img{i}.png")
    return root


def write_videos(root, lengths=(60, 30, 12, 9), size=(24, 20)):
    """Videos of frames named f0.png, f1.png, ... (natural order is not the string order);
    frame k's blue channel is 4 * k, so a crop tells which frame it came from."""
    for v, length in enumerate(lengths):
        folder = root / f"video{v}"
        folder.mkdir(parents=True)
        y, x = np.mgrid[0:size[1], 0:size[0]]
        for k in range(length):
            Image.fromarray(np.stack([x * 10, y * 10, np.full_like(x, 4 * k)], -1).astype(np.uint8)).save(
                folder / f"f{k}.png")
    return root


def pil_decode(blobs, device):
    """Stand-in for nvJPEG in tests: Pillow decodes the bytes on the CPU."""
    return [torch.from_numpy(np.array(Image.open(io.BytesIO(b.numpy().tobytes())).convert("RGB"))).permute(2, 0, 1)
            .to(device) for b in blobs]


def area(box):
    return (box[2] - box[0]) * (box[3] - box[1])


# --- CropMAE's GlobalToLocal crops -------------------------------------------

def test_the_target_box_lies_inside_the_anchor_box_and_areas_stay_in_range():
    rng = np.random.default_rng(0)
    global_areas, local_areas, same_flip = [], [], []
    for _ in range(3000):
        (box,), local, flips = cdgmae.sample_crop_params(rng, 400, 300, 1, 224)
        inner = cdgmae.compose_box(box, local)
        assert box[0] - 1e-12 <= inner[0] < inner[2] <= box[2] + 1e-12
        assert box[1] - 1e-12 <= inner[1] < inner[3] <= box[3] + 1e-12
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
        global_areas.append(area(box))
        local_areas.append(area(local))
        assert area(inner) == pytest.approx(area(box) * area(local))
        same_flip.append(flips[0] == flips[1])
    # Whole-pixel boxes: the area fraction is off the drawn one by at most about a pixel per side.
    assert 0.10 - 0.005 <= min(global_areas) < 0.12 and 0.97 < max(global_areas) <= 1.0
    assert 0.3 - 0.01 <= min(local_areas) < 0.31 and 0.59 < max(local_areas) <= 0.6 + 0.01
    # flips are drawn per view, as CropMAE's: 3000 fair draws have a standard deviation of 0.009, 0.05 is 5.5 of it
    assert np.mean(same_flip) == pytest.approx(0.5, abs=0.05)


@pytest.mark.float_kernels
def test_the_target_pixels_are_the_anchors_source_region_cropped_again(tmp_path):
    root = write_images(tmp_path / "images", count=1)
    size, seed = 32, 3
    dataset = cdgmae.CropDataset(root, ["n00/img0.png"], num_anchors=2, input_size=size, num_patches=16, seed=seed)
    for epoch in range(6):
        target, anchors, _, _ = dataset[(epoch, 0)]
        assert target.shape == (3, size, size) and anchors.shape == (2, 3, size, size)
        assert target.dtype == anchors.dtype == torch.uint8
        rng = np.random.default_rng([seed, epoch, 0])  # the sample's own generator: the same draws again
        boxes, local, flips = cdgmae.sample_crop_params(rng, W, H, 2, size)
        views = [target, anchors[0], anchors[1]]
        for view, box, flip in zip(views, [cdgmae.compose_box(boxes[0], local), *boxes], flips):
            pixels = (view.flip(-1) if flip else view).double()
            centres = (np.arange(size) + 0.5) / size
            x = (box[0] + centres * (box[2] - box[0])) * W - 0.5  # each sample's centre in the image
            y = (box[1] + centres * (box[3] - box[1])) * H - 0.5
            inner = slice(3, size - 3)  # away from the crops' edges, where the filter is cut
            # A normalised symmetric filter reproduces a ramp exactly; each resize rounds by <= 0.5 and the
            # target is resized twice (from the rounded anchor): <= 1 level, plus the fixed-point weights' error
            assert torch.allclose(pixels[0, inner, inner], torch.tensor(x[inner]).expand(size - 6, -1), atol=1.5)
            assert torch.allclose(pixels[1, inner, inner], torch.tensor(y[inner])[:, None].expand(-1, size - 6),
                                  atol=1.5)
        # ... and the target is cut from the resized (unflipped) first anchor, as CropMAE cuts it.
        first = anchors[0].flip(-1) if flips[1] else anchors[0]
        again = cdgmae.crop_resize(first, local, size, mode="bilinear")
        assert torch.equal(target.flip(-1) if flips[0] else target, again)


@pytest.mark.float_kernels
def test_bilinear_crop_resize_is_pillows_bilinear_resize_of_the_boxs_whole_pixels():
    y, x = np.mgrid[0:300, 0:400]
    smooth = 128 + 60 * np.sin(x / 9.0)[..., None] * np.cos(y[..., None] / 7.0 + np.arange(3)) \
        + np.random.default_rng(1).normal(0, 3, (300, 400, 3))
    image = smooth.clip(0, 255).round().astype(np.uint8)
    rng = np.random.default_rng(2)
    for trial in range(12):  # boxes in whole pixels of this image, and between its pixels (rounded)
        box = cdgmae.sample_crop_box(rng, *[(400, 300), (224, 224)][trial % 2], (0.1, 1.0))
        ours = cdgmae.crop_resize(torch.from_numpy(image).permute(2, 0, 1), box, 64, mode="bilinear")
        whole = (round(box[0] * 400), round(box[1] * 300), round(box[2] * 400), round(box[3] * 300))
        pil = Image.fromarray(image).crop(whole).resize((64, 64), Image.BILINEAR)
        # the bound of test_data_path (UINT8_BOUND): two two-pass uint8 resizes of the same pixels with the same
        # filter lie within 2 levels; the bilinear filter has no overshoot, so neither clamps its first pass
        assert np.abs(ours.permute(1, 2, 0).numpy().astype(int) - np.asarray(pil)).max() <= 2


@pytest.mark.float_kernels
def test_crop_samples_are_a_function_of_seed_epoch_and_index_and_the_device_path_agrees(tmp_path):
    root = write_images(tmp_path / "images")
    images = common.find_bags(root, kind="crops")
    assert images == ["n00/img0.png", "n00/img2.png", "n01/img1.png", "n01/img3.png"]
    make = lambda **k: cdgmae.CropDataset(root, images, num_anchors=2, input_size=32, num_patches=16, seed=7, **k)
    a, b = make(), make()
    for key in [(0, 1), (3, 2)]:
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key]))
    assert not torch.equal(a[(0, 1)][0], a[(1, 1)][0])  # another epoch, other crops
    keys = [(2, i) for i in range(len(images))]
    expected = torch.utils.data.default_collate([a[k] for k in keys])
    batch = cdgmae.collate_encoded([make(encoded=True)[k] for k in keys])
    got = cdgmae.assemble_crops_on_device(batch, 32, torch.device("cpu"), decode=pil_decode)
    assert all(torch.equal(x, y) for x, y in zip(got, expected))


# --- SiamMAE's video frames ---------------------------------------------------

def test_the_frame_gap_stays_in_4_to_48_covers_both_ends_and_the_later_frame_is_the_target():
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(4000):
        target, *anchors = cdgmae.sample_frame_indices(rng, 100, num_anchors=3)
        assert all(4 <= target - a <= 48 for a in anchors)
        if len(range(max(0, target - 48), target - 3)) >= 3:
            assert len(set(anchors)) == 3  # distinct frames where the window before the target holds 3
        gaps.append(target - anchors[0])
    assert min(gaps) == 4 and max(gaps) == 48
    assert [cdgmae.sample_frame_indices(rng, 5) for _ in range(20)] == [[4, 0]] * 20  # the shortest video
    assert max(t - a for t, a in (cdgmae.sample_frame_indices(rng, 20) for _ in range(2000))) == 19
    with pytest.raises(ValueError, match="needs at least 5"):
        cdgmae.sample_frame_indices(rng, 4)


def test_frames_share_one_box_and_flip_and_are_read_in_natural_order(tmp_path):
    root = write_videos(tmp_path / "videos")
    videos = common.find_bags(root, kind="frames")
    assert videos == ["video0", "video1", "video2", "video3"]
    dataset = cdgmae.FrameDataset(root, videos, num_anchors=2, input_size=16, num_patches=4, seed=1)
    again = cdgmae.FrameDataset(root, videos, num_anchors=2, input_size=16, num_patches=4, seed=1)
    for epoch in range(5):
        for index in range(len(videos)):
            target, anchors, target_noise, anchor_noise = dataset[(epoch, index)]
            assert anchors.shape == (2, 3, 16, 16) and anchor_noise.shape == (2, 4)
            for anchor in anchors:
                assert torch.equal(anchor[:2], target[:2])  # red and green: the same box and flip
                gap = (int(target[2, 0, 0]) - int(anchor[2, 0, 0])) // 4  # blue: 4 x the frame's number
                assert 4 <= gap <= 48
            assert all(torch.equal(x, y) for x, y in zip(dataset[(epoch, index)], again[(epoch, index)]))
    encoded = cdgmae.FrameDataset(root, videos, num_anchors=2, input_size=16, num_patches=4, seed=1, encoded=True)
    keys = [(3, i) for i in range(len(videos))]
    batch = cdgmae.collate_encoded([encoded[k] for k in keys])
    got = cdgmae.assemble_on_device(batch, 16, torch.device("cpu"), decode=pil_decode, mode="bilinear")
    assert all(torch.equal(x, y) for x, y in zip(got, torch.utils.data.default_collate([dataset[k] for k in keys])))


# --- Through the trainer --------------------------------------------------------

@pytest.mark.parametrize("pretext, expected_mask", [("crops", 0.985), ("frames", 0.95)])
def test_each_pretext_trains_and_a_resume_with_another_pretext_is_refused(tmp_path, capsys, pretext, expected_mask):
    root = write_images(tmp_path / "data") if pretext == "crops" else write_videos(tmp_path / "data")
    output = tmp_path / "run"
    argv = ["--data", str(root), "--output", str(output), "--batch-size", "2", "--epochs", "2",
            "--pretext", pretext, "--anchors", "2", *TINY]
    cdgmae.main([*argv, "--max-steps", "2"])
    settings = json.loads((output / "args.json").read_text())
    assert settings["pretext"] == pretext and settings["target_mask_ratio"] == expected_mask
    assert settings["bags"].startswith(f"4 {'images' if pretext == 'crops' else 'videos'}, sha1")
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    before = (output / "checkpoint-last.pth").read_bytes()
    other = "frames" if pretext == "crops" else "crops"
    with pytest.raises(SystemExit) as refused:
        cdgmae.main([*argv, "--pretext", other, "--max-steps", "3", "--resume", "auto"])
    message = str(refused.value.code)
    assert f"--pretext: {pretext} -> {other}" in message and "\n" not in message
    assert "Traceback" not in capsys.readouterr().err
    assert (output / "checkpoint-last.pth").read_bytes() == before


def test_an_explicit_target_mask_wins_over_the_pretexts_default():
    parser = cdgmae.get_args_parser()
    cases = [([], 0.9), (["--pretext", "crops"], 0.985), (["--pretext", "crops", "--target-mask", "0.75"], 0.75)]
    for argv, mask in cases:
        args = parser.parse_args(argv)
        cdgmae.check_args(parser, args)
        assert cdgmae.model_config(args)["target_mask_ratio"] == mask
    args = parser.parse_args(["--pretext", "crops"])
    cdgmae.check_args(parser, args)
    assert tuple(args.crop_scale) == (0.10, 1.0) and tuple(args.local_scale) == (0.3, 0.6)


def test_a_video_shorter_than_5_frames_is_a_start_up_error_naming_it(tmp_path):
    root = write_videos(tmp_path / "videos", lengths=(12, 3, 9))
    with pytest.raises(SystemExit) as error:
        cdgmae.main(["--data", str(root), "--output", str(tmp_path / "run"), "--batch-size", "2",
                     "--pretext", "frames", *TINY])
    message = str(error.value.code)
    assert "video1: 3 frames, needs at least 5" in message and "\n" not in message
    assert (tmp_path / "run" / "video-problems.txt").read_text().startswith("video1\t")
    assert not (tmp_path / "run" / "checkpoint-last.pth").exists()


def test_an_unreadable_image_is_replaced_by_the_next_one_deterministically(tmp_path, capsys):
    root = write_images(tmp_path / "images")
    (root / "n00" / "img2.png").write_bytes(b"\x89PNG broken")
    images = common.find_bags(root, kind="crops")
    first = cdgmae.CropDataset(root, images, input_size=16, num_patches=4, seed=2)
    second = cdgmae.CropDataset(root, images, input_size=16, num_patches=4, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(first[(0, 1)], second[(0, 1)]))
    assert "image n00/img2.png is replaced by the next image" in capsys.readouterr().err


@pytest.mark.parametrize("pretext", ["crops", "frames"])
def test_a_stopped_and_resumed_run_ends_with_the_uninterrupted_runs_weights(tmp_path, pretext):
    root = write_images(tmp_path / "data") if pretext == "crops" else write_videos(tmp_path / "data", (10, 8, 6, 5))
    argv = ["--data", str(root), "--batch-size", "2", "--epochs", "1", "--warmup-epochs", "0.4",
            "--pretext", pretext, "--anchors", "2", "--anchor-mask", "0.25", *TINY]
    cdgmae.main([*argv, "--output", str(tmp_path / "whole")])
    cdgmae.main([*argv, "--output", str(tmp_path / "parts"), "--max-steps", "1"])  # stops after 1 of 2 steps
    cdgmae.main([*argv, "--output", str(tmp_path / "parts"), "--resume", "auto"])
    whole, parts = (torch.load(tmp_path / run / "checkpoint-last.pth", weights_only=True)["model"]
                    for run in ("whole", "parts"))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
