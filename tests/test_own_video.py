"""Propagation on your own clip (propagate.py, "Your own video"): a folder of frames or a video
file and a first-frame mask or keypoints in; per-frame palette PNGs (or joint positions) and an
overlay a person can watch out; one-line errors for a wrong mask or an unreadable video."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import torch
from PIL import Image

import common
import evaluate as ev
import propagate as pr
from cdgmae import VisionTransformer

pytestmark = pytest.mark.float_kernels  # the verdicts compare float results of torch's kernels

ROOT = Path(__file__).resolve().parents[1]
H, W, SIDE, FRAMES = 48, 64, 16, 5


def square_frame(t):
    """A textured 16x16 square moving 4 pixels right per frame over a fixed textured background."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    square = np.random.default_rng(1).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    x0 = 8 + 4 * t
    image[16:16 + SIDE, x0:x0 + SIDE] = square
    return image


def square_mask(t, object_id=1):
    ids = np.zeros((H, W), np.uint8)
    ids[16:16 + SIDE, 8 + 4 * t:8 + 4 * t + SIDE] = object_id
    return ids


def write_frames(folder, names=None):
    folder.mkdir(parents=True)
    names = names or [f"frame_{t}.png" for t in range(FRAMES)]
    for t, name in enumerate(names):
        Image.fromarray(square_frame(t)).save(folder / name)
    return folder


def write_mp4(path):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "0"}  # lossless, so the decoded first frame is the one drawn
        for t in range(FRAMES):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(square_frame(t), format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit.pth"
    torch.save({"model": vit.state_dict()}, path)
    return path


def run(argv):
    """propagate.main in-process."""
    return pr.main([str(a) for a in argv])


def write_mask(path, ids, mode="P"):
    if mode == "P":
        ev.write_palette_png(path, ids)
    else:
        Image.fromarray(ids, mode="L").save(path)
    return path


# -----------------------------------------------------------------------------
# Outputs
# -----------------------------------------------------------------------------

def test_folder_of_frames_gives_a_palette_png_per_frame_and_an_overlay(tmp_path, checkpoint):
    # natural order: frame_10 comes after frame_9, not after frame_1
    names = [f"frame_{t}.png" for t in (1, 2, 9, 10, 11)]
    frames = write_frames(tmp_path / "clip", names)
    mask = write_mask(tmp_path / "first.png", square_mask(0, object_id=3))
    out = tmp_path / "out"
    result = run(["--video", frames, "--first-mask", mask, "--checkpoint", checkpoint, "--output", out,
                  "--input-size", H, W])
    assert [p.name for p in result["frames"]] == names
    pngs = sorted((out / "masks").iterdir(), key=common.natural_key)
    assert [p.name for p in pngs] == [f"{Path(n).stem}.png" for n in names]
    for t, png in enumerate(pngs):
        with Image.open(png) as im:
            assert im.mode == "P" and im.size == (W, H)
            assert np.array_equal(np.asarray(im.getpalette()[:12]).reshape(4, 3), ev.davis_palette()[:4])
            assert set(np.unique(np.array(im))) <= {0, 3}  # the first mask's ids, nothing else
    # frame 0 is the given mask after the protocol's round trip through the feature grid (corners round off)
    assert ev.region_similarity(square_mask(0) > 0, ev.read_label_png(pngs[0]) == 3) > 0.9
    with Image.open(out / "overlay.gif") as gif:
        assert gif.n_frames == FRAMES and gif.size == (W, H)
    settings = json.loads((out / "propagation.json").read_text())
    assert (settings["topk"], settings["queue_length"], settings["radius"]) == (7, 20, 20)  # Table 7, DAVIS


def test_video_file_is_decoded_and_gives_an_mp4_overlay(tmp_path, checkpoint):
    av = pytest.importorskip("av")
    video = write_mp4(tmp_path / "clip.mp4")
    mask = write_mask(tmp_path / "first.png", square_mask(0), mode="L")  # a grayscale id PNG works too
    out = tmp_path / "out"
    run(["--video", video, "--first-mask", mask, "--checkpoint", checkpoint, "--output", out,
         "--input-size", H, W, "--overlay", "mp4"])
    assert sorted(p.name for p in (out / "frames").iterdir()) == [f"{t:05d}.jpg" for t in range(FRAMES)]
    assert len(list((out / "masks").iterdir())) == FRAMES
    with Image.open(out / "masks/00004.png") as im:
        assert im.mode == "P" and im.size == (W, H)
    with av.open(str(out / "overlay.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (W, H) and float(stream.average_rate) == 10  # the clip's rate
        assert sum(1 for _ in container.decode(video=0)) == FRAMES


def test_keypoints_are_propagated_to_every_frame(tmp_path, checkpoint):
    frames = write_frames(tmp_path / "clip")
    keypoints = tmp_path / "first.json"
    keypoints.write_text(json.dumps([[16, 16], [24, 32], None]))  # on cell corners (8-pixel cells)
    out = tmp_path / "out"
    run(["--video", frames, "--first-keypoints", keypoints, "--checkpoint", checkpoint, "--output", out,
         "--input-size", H, W, "--overlay", "webp"])
    rows = json.loads((out / "keypoints.json").read_text())
    assert len(rows) == FRAMES and all(len(r) == 3 for r in rows)
    assert rows[0] == [[16, 16], [24, 32], None]  # the first frame decodes back exactly
    assert all(r[2] is None for r in rows)  # a hidden joint stays hidden
    assert ev.read_joints_mat(out / "joint_positions.mat", num_joints=None).shape == (FRAMES, 3, 2)
    with Image.open(out / "overlay.webp") as webp:
        assert webp.n_frames == FRAMES


def test_jhmdb_mat_gives_the_first_frames_keypoints(tmp_path, checkpoint):
    frames = write_frames(tmp_path / "clip")
    pos = np.zeros((2, 15, 2))  # pos_img [2, J, T], 1-based; only frame 0 is read
    pos[:, :, 0] = np.array([[16 + 8 * (j % 5), 16 + 8 * (j // 5)] for j in range(15)]).T + 1  # interior cells
    pos[:, :, 1] = 1
    sio.savemat(tmp_path / "joint_positions.mat", {"pos_img": pos})
    pr.propagate_own_video(frames, tmp_path / "out", checkpoint, keypoints=tmp_path / "joint_positions.mat",
                           input_size=(H, W), overlay="gif", progress=False)
    rows = json.loads((tmp_path / "out/keypoints.json").read_text())
    assert rows[0] == (pos[:, :, 0].T - 1).tolist()  # the given cells decode back exactly
    with Image.open(tmp_path / "out/overlay.gif") as gif:  # 15 joints: drawn with JHMDB's skeleton
        assert gif.n_frames == FRAMES


def test_static_clip_keeps_its_mask(tmp_path, checkpoint):
    folder = tmp_path / "clip"
    folder.mkdir()
    for t in range(3):
        Image.fromarray(square_frame(0)).save(folder / f"{t}.png")
    ids = np.zeros((H, W), np.uint8)
    ids[8:24] = 1  # whole 8-pixel cells: the bilinear round trip puts the edges back exactly
    mask = write_mask(tmp_path / "first.png", ids)
    pr.propagate_own_video(folder, tmp_path / "out", checkpoint, mask=mask, input_size=(H, W), overlay="none",
                           progress=False)
    for t in range(3):
        assert np.array_equal(ev.read_label_png(tmp_path / f"out/masks/{t}.png"), ids)
    assert not (tmp_path / "out/overlay.gif").exists()


# -----------------------------------------------------------------------------
# Faults: one line naming the file, exit status 1, no traceback, nothing overwritten
# -----------------------------------------------------------------------------

def cli(argv):
    return subprocess.run([sys.executable, "propagate.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True)


def assert_one_line(proc, *names):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for name in names:
        assert str(name) in proc.stderr


def test_mask_of_the_wrong_size_names_both_sizes(tmp_path, checkpoint):
    frames = write_frames(tmp_path / "clip")
    mask = write_mask(tmp_path / "first.png", np.ones((H // 2, W), np.uint8))
    proc = cli(["--video", frames, "--first-mask", mask, "--checkpoint", checkpoint, "--output", tmp_path / "out"])
    assert_one_line(proc, mask, f"{W}x{H // 2}", f"{W}x{H}")
    assert not (tmp_path / "out").exists()


def test_unreadable_video_is_named(tmp_path, checkpoint):
    pytest.importorskip("av")
    video = tmp_path / "broken.mp4"
    video.write_bytes(b"this is not a video" * 50)
    mask = write_mask(tmp_path / "first.png", square_mask(0))
    with pytest.raises(SystemExit) as exit_info:
        run(["--video", video, "--first-mask", mask, "--checkpoint", checkpoint, "--output", tmp_path / "out"])
    message = exit_info.value.code  # SystemExit(str): Python prints it alone on stderr and exits with status 1
    assert isinstance(message, str) and message.startswith(f"{video}: cannot read the video") and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_video_file_without_pyav_is_one_line(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 64)
    mask = write_mask(tmp_path / "first.png", square_mask(0))
    with pytest.raises(SystemExit) as exit_info:
        run(["--video", video, "--first-mask", mask, "--checkpoint", checkpoint, "--output", tmp_path / "out"])
    assert str(exit_info.value.code).startswith(f"{video}: video files need PyAV (pip install av==18.1.0)")


def test_finished_output_is_not_overwritten(tmp_path, checkpoint):
    frames = write_frames(tmp_path / "clip")
    mask = write_mask(tmp_path / "first.png", square_mask(0))
    (tmp_path / "out/masks").mkdir(parents=True)
    (tmp_path / "out/masks/keep.png").write_bytes(b"mine")
    with pytest.raises(SystemExit) as exit_info:
        run(["--video", frames, "--first-mask", mask, "--checkpoint", checkpoint, "--output", tmp_path / "out"])
    assert str(exit_info.value.code).startswith(f"{tmp_path / 'out/masks'}: already exists")
    assert (tmp_path / "out/masks/keep.png").read_bytes() == b"mine"


def test_keypoint_outside_the_frame_is_named(tmp_path, checkpoint):
    frames = write_frames(tmp_path / "clip")
    keypoints = tmp_path / "first.json"
    keypoints.write_text(json.dumps([[10, 10], [W + 5, 10]]))
    with pytest.raises(SystemExit) as exit_info:
        run(["--video", frames, "--first-keypoints", keypoints, "--checkpoint", checkpoint,
             "--output", tmp_path / "out"])
    assert str(exit_info.value.code) == f"{keypoints}: keypoint 1 at ({W + 5}, 10) lies outside the {W}x{H} frame"
