"""Bad inputs to propagate.py and evaluate.py (issue 9): one test per class of fault.

Each test builds a tiny valid dataset, breaks it in every way of its class, and asserts what
the issue asks of each: exit status != 0, the message names the file or flag (the right one:
an annotation is blamed for the annotation's fault, a prediction for the prediction's), no
traceback, one line, and nothing written or overwritten.
"""
import errno
import json
import os
import shutil
import socket
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
import cdgmae
from cdgmae import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
H, W = 32, 48  # frames; 8-pixel patches -> a 4x6 grid


# -----------------------------------------------------------------------------
# Tiny datasets, checkpoints and the command-line runner
# -----------------------------------------------------------------------------

def tiny_checkpoint(path, seed=0):
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=1)
    torch.save({"model": vit.state_dict()}, path)
    return path


def bands(low=1, high=2):
    """Ids [H, W]: background, a band of `low`, a band of `high`."""
    ids = np.zeros((H, W), np.uint8)
    ids[8:16], ids[24:32] = low, high
    return ids


def frame_image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8))


def make_davis(root, frames=4):
    for t in range(frames):
        (root / "JPEGImages/480p/seq").mkdir(parents=True, exist_ok=True)
        frame_image(0).save(root / f"JPEGImages/480p/seq/{t:05d}.jpg", quality=95)
        ev.write_palette_png(root / f"Annotations/480p/seq/{t:05d}.png", bands())
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "ImageSets/2017/val.txt").write_text("seq\n")
    return root


def make_vip(root, frames=3):
    (root / "Images/videos1").mkdir(parents=True)
    for t in range(1, frames + 1):
        frame_image(1).save(root / f"Images/videos1/{t:012d}.jpg", quality=95)
        ev.write_class_png(root / f"Annotations/Category_ids/videos1/{t:012d}.png", bands(7, 13))
    return root


def make_jhmdb(root, frames=3):
    (root / "Rename_Images/clap/v1").mkdir(parents=True)
    for t in range(1, frames + 1):
        Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(
            root / f"Rename_Images/clap/v1/{t:05d}.png")
    xy = np.array([(x, y) for y in (2, 3, 4, 5) for x in range(2, 10)][:15], np.float64) * 8
    write_pos_img(root / "joint_positions/clap/v1/joint_positions.mat", np.repeat(xy.T[:, :, None] + 1, frames, 2))
    return root


def write_pos_img(path, pos):
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.savemat(path, {"pos_img": pos})


def run(module, argv, capsys):
    """module.main(argv) as the command line runs it: (exit status, stderr as printed)."""
    try:
        module.main(argv)
        status, message = 0, ""
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
        message = e.code if isinstance(e.code, str) else ""
        assert "\n" not in message, message  # one line
    return status, capsys.readouterr().err + message


def snapshot(folder):
    """{relative path: bytes} of every file under folder (hidden ones included); None if absent."""
    folder = Path(folder)
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(status, err, *names, folder=None, before=None):
    assert status != 0, err
    assert "Traceback" not in err, err
    for name in names:
        assert str(name) in err, (name, err)
    if folder is not None:
        assert snapshot(folder) == before, "files were written or overwritten"


def propagate_argv(dataset, root, checkpoint, out, *extra):
    size = ["64", "96"] if dataset == "jhmdb" else [str(H), str(W)]
    return ["--dataset", dataset, "--data-root", str(root), "--checkpoint", str(checkpoint), "--output", str(out),
            "--input-size", *size, "--device", "cpu", *extra]


def evaluate_argv(dataset, root, predictions, *extra):
    return ["--dataset", dataset, "--data-root", str(root), "--predictions", str(predictions), "--no-progress", *extra]


@pytest.fixture
def checkpoint(tmp_path):
    return tiny_checkpoint(tmp_path / "vit.pth")


def check_both_tools(dataset, root, checkpoint, tmp_path, capsys, blamed, *words):
    """propagate.py and evaluate.py (on perfect predictions: copies of the annotations) both
    refuse the dataset, name `blamed`, and write nothing."""
    out = tmp_path / "out"
    status, err = run(pr, propagate_argv(dataset, root, checkpoint, out), capsys)
    assert_refused(status, err, blamed, *words, folder=out, before=None)
    predictions = tmp_path / "pred"
    shutil.rmtree(predictions, ignore_errors=True)
    labels = {"davis": "Annotations/480p", "vip": "Annotations/Category_ids"}.get(dataset, "joint_positions")
    shutil.copytree(root / labels, predictions)
    before = snapshot(predictions)
    status, err = run(ev, evaluate_argv(dataset, root, predictions), capsys)
    assert_refused(status, err, blamed, *words, folder=predictions, before=before)


# -----------------------------------------------------------------------------
# Wrong data: an error naming the right file, never a score
# -----------------------------------------------------------------------------

def broken_label_files():
    """(name, writer): label files that are not palette / single-channel 8-bit id images."""
    rgb = lambda p: Image.fromarray(np.stack([bands() * 60] * 3, -1)).save(p)  # noqa: E731 -- colours, not ids
    sixteen = lambda p: Image.fromarray(bands().astype(np.uint16) * 300).save(p)  # noqa: E731 -- 'I;16'
    bilevel = lambda p: Image.fromarray(bands() > 0).save(p)  # noqa: E731 -- mode '1'
    jpeg = lambda p: frame_image(3).save(p, format="JPEG")  # noqa: E731 -- a photo named .png
    truncated = lambda p: p.write_bytes(p.read_bytes()[:60])  # noqa: E731
    empty = lambda p: p.write_bytes(b"")  # noqa: E731
    return [("rgb", rgb), ("16-bit", sixteen), ("bilevel", bilevel), ("jpeg", jpeg),
            ("truncated", truncated), ("empty", empty)]


@pytest.mark.parametrize("dataset", ["davis", "vip"])
def test_label_files_that_are_not_id_images_are_refused(tmp_path, capsys, checkpoint, dataset):
    for frame in (0, 2):  # the first annotation and a later one: all are checked before any work
        for kind, write in broken_label_files():
            root = (make_davis if dataset == "davis" else make_vip)(tmp_path / f"{kind}{frame}")
            labels = sorted((root / "Annotations").rglob("*.png"))
            write(labels[frame])
            check_both_tools(dataset, root, checkpoint, tmp_path, capsys, labels[frame])


def test_davis_ids_that_are_not_0_to_K_are_refused(tmp_path, capsys, checkpoint):
    grey = np.select([bands() == 1, bands() == 2], [38, 113], 0).astype(np.uint8)
    grey[0:4] = 75                                          # grey levels {0, 38, 75, 113}
    gap = bands(1, 3)                                       # {0, 1, 3}: object 2 missing
    many = (np.arange(H * W).reshape(H, W) % 150).astype(np.uint8)  # 0..149: not an object map
    cases = [("grey", 0, grey, "official evaluator"), ("gap", 0, gap, "0..K"), ("many", 0, many, "0..K"),
             ("none", 0, np.zeros((H, W), np.uint8), "no object"), ("later", 2, bands(1, 3), "objects 1..2")]
    for name, frame, ids, words in cases:
        root = make_davis(tmp_path / name)
        path = root / f"Annotations/480p/seq/{frame:05d}.png"
        ev.write_palette_png(path, ids)
        check_both_tools("davis", root, checkpoint, tmp_path, capsys, path, words)
    # void (255) is allowed in annotations, the first one too, where it is propagated as background
    # (a predicted 255 would stop the official scorer, so predictions holding it are refused)
    root = make_davis(tmp_path / "void")
    with_void = bands()
    with_void[0:2] = 255
    ev.write_palette_png(root / "Annotations/480p/seq/00000.png", with_void)
    out = tmp_path / "void_out"
    assert run(pr, propagate_argv("davis", root, checkpoint, out), capsys)[0] == 0
    assert ev.read_label_png(out / "seq/00001.png").max() == 2
    assert run(ev, evaluate_argv("davis", root, out), capsys)[0] == 0
    ev.write_palette_png(out / "seq/00001.png", with_void)
    assert_refused(*run(ev, evaluate_argv("davis", root, out), capsys), out / "seq/00001.png", "ids {255}")


def test_labels_of_another_size_than_their_frame_are_refused(tmp_path, capsys, checkpoint):
    for dataset, make, write in [("davis", make_davis, ev.write_palette_png), ("vip", make_vip, ev.write_class_png)]:
        for frame, (h, w) in [(0, (H // 2, W // 2)), (1, (H + 8, W)), (0, (W, H))]:  # smaller, taller, transposed
            root = make(tmp_path / f"{dataset}{frame}{h}x{w}")
            path = sorted((root / "Annotations").rglob("*.png"))[frame]
            write(path, np.array(Image.fromarray(bands() * (7 if dataset == "vip" else 1)).resize((w, h), Image.NEAREST)))
            check_both_tools(dataset, root, checkpoint, tmp_path, capsys, path, f"{w}x{h}")
        root = make(tmp_path / f"{dataset}_frames")  # frames of one video differ in size
        frame = sorted((root / ("JPEGImages" if dataset == "davis" else "Images")).rglob("*.jpg"))[1]
        frame_image(0).resize((W + 8, H)).save(frame)
        check_both_tools(dataset, root, checkpoint, tmp_path, capsys, frame, "one size")


def test_vip_ids_outside_the_20_classes_blame_the_file_that_holds_them(tmp_path, capsys, checkpoint):
    for frame, value in [(0, 25), (0, 255), (0, 20), (2, 20), (2, 255)]:
        root = make_vip(tmp_path / f"gt{frame}_{value}")
        path = root / f"Annotations/Category_ids/videos1/{frame + 1:012d}.png"
        ev.write_class_png(path, bands(7, value))
        check_both_tools("vip", root, checkpoint, tmp_path, capsys, path, "0..19")
    root = make_vip(tmp_path / "pred")
    out = tmp_path / "pred_out"
    assert run(pr, propagate_argv("vip", root, checkpoint, out), capsys)[0] == 0
    for value in (20, 255):
        bad = out / "videos1/000000000002.png"
        ev.write_class_png(bad, bands(7, value))
        before = snapshot(out)
        status, err = run(ev, evaluate_argv("vip", root, out), capsys)
        assert_refused(status, err, bad, "prediction", "0..19", folder=out, before=before)
        assert "Annotations" not in err


def test_jhmdb_joint_files_of_the_wrong_shape_are_refused(tmp_path, capsys, checkpoint):
    good = sio.loadmat(make_jhmdb(tmp_path / "ref") / "joint_positions/clap/v1/joint_positions.mat")["pos_img"]
    nan = good.copy()
    nan[0, 3, 1] = np.nan
    cases = [("13 joints", lambda p: write_pos_img(p, good[:, :13]), "2x13x3"),
             ("3 coordinates", lambda p: write_pos_img(p, np.concatenate([good, good[:1]])), "3x15x3"),
             ("joints last", lambda p: write_pos_img(p, good.transpose(0, 2, 1)), "2x3x15"),
             ("more frames", lambda p: write_pos_img(p, np.concatenate([good, good[:, :, :1]], 2)), "4 frames"),
             ("fewer frames", lambda p: write_pos_img(p, good[:, :, :2]), "2 frames"),
             ("no pos_img", lambda p: sio.savemat(p, {"pos_world": good}), "pos_img"),
             ("text", lambda p: sio.savemat(p, {"pos_img": "x"}), "pos_img"),
             ("nan", lambda p: write_pos_img(p, nan), "NaN"),
             ("garbage", lambda p: p.write_bytes(b"not a mat file at all"), "cannot read")]
    for name, write, words in cases:
        root = make_jhmdb(tmp_path / name.replace(" ", "_"))
        path = root / "joint_positions/clap/v1/joint_positions.mat"
        write(path)
        check_both_tools("jhmdb", root, checkpoint, tmp_path, capsys, path, words)
    root = make_jhmdb(tmp_path / "frame_size")  # frames of one video differ in size
    frame = root / "Rename_Images/clap/v1/00002.png"
    Image.open(frame).resize((90, 64)).save(frame)
    out = tmp_path / "frame_size_out"
    assert_refused(*run(pr, propagate_argv("jhmdb", root, checkpoint, out), capsys), frame, "90x64", folder=out)
    # predictions: the same shape rules (NaN allowed: "not visible"), blamed on the prediction
    root = make_jhmdb(tmp_path / "pred")
    out = tmp_path / "pred_out"
    assert run(pr, propagate_argv("jhmdb", root, checkpoint, out), capsys)[0] == 0
    for pos, words in [(good[:, :14], "2x14x3"), (good[:, :, :2], "2 frames")]:
        write_pos_img(out / "clap/v1/joint_positions.mat", pos)
        before = snapshot(out)
        status, err = run(ev, evaluate_argv("jhmdb", root, out), capsys)
        assert_refused(status, err, out / "clap/v1/joint_positions.mat", words, folder=out, before=before)


def test_davis_predictions_of_the_wrong_size_format_or_ids_are_refused(tmp_path, capsys, checkpoint):
    root = make_davis(tmp_path / "DAVIS")
    out = tmp_path / "out"
    assert run(pr, propagate_argv("davis", root, checkpoint, out), capsys)[0] == 0
    bad = out / "seq/00001.png"
    cases = [(lambda p: ev.write_palette_png(p, bands()[:, :W // 2]), "24x32"),
             (lambda p: Image.fromarray(np.stack([bands() * 60] * 3, -1)).save(p), "'RGB'"),
             (lambda p: p.write_bytes(p.read_bytes()[:50]), "cannot"),
             (lambda p: ev.write_palette_png(p, bands(1, 3)), "ids {3}"),
             (lambda p: p.unlink(), "missing")]
    for write, words in cases:
        ev.write_palette_png(bad, bands())
        write(bad)
        before = snapshot(out)
        status, err = run(ev, evaluate_argv("davis", root, out), capsys)
        assert_refused(status, err, bad, words, folder=out, before=before)


def test_videos_too_short_to_be_scored_are_refused_before_any_work(tmp_path, capsys, checkpoint):
    """DAVIS scores frames 1..T-2 and JHMDB the frames after the first: a DAVIS video of 1 or 2
    frames, or a JHMDB video of 1, has no scored frame, and its mean over no frame would be NaN
    (the official scorer prints it as the score)."""
    for frames in (1, 2):
        root = make_davis(tmp_path / f"davis{frames}", frames=frames)
        check_both_tools("davis", root, checkpoint, tmp_path, capsys, root / "JPEGImages/480p/seq", "at least 3")
    root = make_jhmdb(tmp_path / "jhmdb1", frames=1)
    check_both_tools("jhmdb", root, checkpoint, tmp_path, capsys, root / "Rename_Images/clap/v1", "at least 2")
    # the shortest videos that can be scored are scored: one frame each, perfect predictions score 100
    root = make_davis(tmp_path / "davis3", frames=3)
    assert ev.evaluate_dataset("davis", root, root / "Annotations/480p", progress=False)["J&F_m"] == 100
    root = make_jhmdb(tmp_path / "jhmdb2", frames=2)
    assert ev.evaluate_dataset("jhmdb", root, root / "joint_positions", progress=False)["PCK@0.1"] == 100


def test_joint_coordinates_that_are_no_positions_name_the_file_and_frame(tmp_path, capsys, checkpoint):
    root = make_jhmdb(tmp_path / "gt")
    good = sio.loadmat(root / "joint_positions/clap/v1/joint_positions.mat")["pos_img"]
    for value in (np.nan, np.inf):  # ground truth: every coordinate is a position
        bad = good.copy()
        bad[1, 3, 1] = value
        write_pos_img(root / "joint_positions/clap/v1/joint_positions.mat", bad)
        check_both_tools("jhmdb", root, checkpoint, tmp_path, capsys, root / "joint_positions/clap/v1/joint_positions.mat",
                         "frame 2, joint 3")
    write_pos_img(root / "joint_positions/clap/v1/joint_positions.mat", good)
    # a prediction: NaN marks a joint it does not see (scored as not visible), an infinity is no position
    predictions = tmp_path / "predicted"
    shutil.copytree(root / "joint_positions", predictions)
    hidden = good.copy()
    hidden[:, 3, 1] = np.nan
    write_pos_img(predictions / "clap/v1/joint_positions.mat", hidden)
    assert run(ev, evaluate_argv("jhmdb", root, predictions), capsys)[0] == 0
    hidden[0, 5, 2] = -np.inf
    write_pos_img(predictions / "clap/v1/joint_positions.mat", hidden)
    before = snapshot(predictions)
    status, err = run(ev, evaluate_argv("jhmdb", root, predictions), capsys)
    assert_refused(status, err, predictions / "clap/v1/joint_positions.mat", "infinite", "frame 3, joint 5",
                   folder=predictions, before=before)


def test_predictions_missing_a_frame_are_named_and_a_missing_object_scores_zero(tmp_path, capsys, checkpoint):
    for dataset, make, labels, missing in [("vip", make_vip, "Annotations/Category_ids", "videos1/000000000002.png"),
                                           ("jhmdb", make_jhmdb, "joint_positions", "clap/v1/joint_positions.mat")]:
        root = make(tmp_path / dataset)
        predictions = tmp_path / f"{dataset}_pred"
        shutil.copytree(root / labels, predictions)
        (predictions / missing).unlink()
        before = snapshot(predictions)
        status, err = run(ev, evaluate_argv(dataset, root, predictions), capsys)
        assert_refused(status, err, predictions / missing, "missing", folder=predictions, before=before)
    # DAVIS: a prediction without object 2 is a prediction (the official scorer scores it): that
    # object's J and F are 0 (an empty prediction against a non-empty truth), object 1's are 100
    root = make_davis(tmp_path / "davis")
    predictions = tmp_path / "davis_pred"
    for t in range(4):
        ev.write_palette_png(predictions / f"seq/{t:05d}.png", bands(1, 0))
    rows = {r["sequence"]: r for r in ev.evaluate_dataset("davis", root, predictions, progress=False)["rows"]}
    assert (rows["seq_1"]["J&F"], rows["seq_2"]["J"], rows["seq_2"]["F"]) == (100, 0, 0)


def test_a_class_absent_from_the_first_frame_is_scored_and_a_davis_object_id_refused(tmp_path, capsys, checkpoint):
    """VIP: CRW's protocol scores every frame over all 20 classes; a class that appears after the
    first frame cannot be propagated and scores IoU 0. DAVIS: objects are the first frame's ids, so
    a later annotation with another id is an error (test_davis_ids_that_are_not_0_to_K_are_refused)."""
    root = make_vip(tmp_path / "vip")
    later = bands(7, 13)
    later[0:4] = 5  # "dress" from the second frame on
    for t in (2, 3):
        ev.write_class_png(root / f"Annotations/Category_ids/videos1/{t:012d}.png", later)
    out = tmp_path / "out"
    assert run(pr, propagate_argv("vip", root, checkpoint, out), capsys)[0] == 0
    summary = ev.evaluate_dataset("vip", root, out, progress=False)
    assert summary["IoU_dress"] == 0 and 0 < summary["mIoU"] < 100


# -----------------------------------------------------------------------------
# Flags, missing or unreadable inputs, settings of an earlier run, full disks
# -----------------------------------------------------------------------------

PROPAGATE_BAD_FLAGS = [("--topk", "0"), ("--topk", "-3"), ("--topk", "2.5"), ("--queue-length", "-1"),
                       ("--radius", "0"), ("--radius", "-2"), ("--radius", "nan"), ("--temperature", "0"),
                       ("--temperature", "-0.7"), ("--temperature", "inf"), ("--input-size", "0"),
                       ("--size-multiple", "0"), ("--batch-size", "0"), ("--num-heads", "0"), ("--threads", "0"),
                       ("--visualize-frames", "0")]


def test_bad_flags_are_one_argparse_error_naming_the_flag(tmp_path, capsys, checkpoint):
    root = make_davis(tmp_path / "DAVIS")
    out = tmp_path / "out"
    for flag, value in PROPAGATE_BAD_FLAGS:
        status, err = run(pr, propagate_argv("davis", root, checkpoint, out, flag, value), capsys)
        assert status == 2 and f"argument {flag}: " in err and "Traceback" not in err, (flag, value, err)
    status, err = run(pr, propagate_argv("davis", root, checkpoint, out) + ["--input-size", "32", "48", "8"], capsys)
    assert status == 2 and "--input-size" in err
    for value in ("0", "1.5", "-0.1", "nan", "x"):
        status, err = run(ev, evaluate_argv("jhmdb", root, out, "--alphas", "0.1", value), capsys)
        assert status == 2 and "argument --alphas: " in err and "Traceback" not in err, (value, err)
    # values valid alone but not for this model or data: named before any work
    for extra, words in [(["--input-size", "30", "48"], "--input-size"),
                         (["--topk", "1000", "--queue-length", "0"], "--topk 1000")]:
        status, err = run(pr, propagate_argv("davis", root, checkpoint, out) + extra, capsys)
        assert_refused(status, err, words, folder=out, before=None)
    # 0 is a value, not "use the default": the library refuses it instead of running with 7 / 0.7
    for key in ("topk", "temperature", "radius"):
        with pytest.raises(common.InputError, match=f"--{key} 0"):
            pr.propagate_dataset("davis", root, checkpoint, out, input_size=(H, W), progress=False, **{key: 0})
    result = pr.propagate_dataset("davis", root, checkpoint, out, input_size=(H, W), queue_length=0, progress=False)
    assert result["settings"]["queue_length"] == 0


def test_missing_or_unreadable_inputs_are_one_line(tmp_path, capsys, checkpoint):
    root = make_davis(tmp_path / "DAVIS")
    out = tmp_path / "out"
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02not a checkpoint")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[:2000])
    not_vit = tmp_path / "not_vit.pth"
    torch.save({"model": {"weight": torch.zeros(3)}}, not_vit)
    (tmp_path / "list.txt").write_text("seq\nnot-there\n")
    cases = [(propagate_argv("davis", tmp_path / "nowhere", checkpoint, out), tmp_path / "nowhere"),
             (propagate_argv("davis", root, checkpoint, out, "--list", str(tmp_path / "none.txt")), "none.txt"),
             (propagate_argv("davis", root, checkpoint, out, "--list", str(tmp_path / "list.txt")), "not-there"),
             (propagate_argv("davis", root, tmp_path / "missing.pth", out), "missing.pth"),
             (propagate_argv("davis", root, garbage, out), garbage),
             (propagate_argv("davis", root, truncated, out), truncated),
             (propagate_argv("davis", root, not_vit, out), not_vit),
             (propagate_argv("davis", root, tmp_path, out), tmp_path)]
    for argv, name in cases:
        assert_refused(*run(pr, argv, capsys), name, folder=out, before=None)
    frame = root / "JPEGImages/480p/seq/00002.jpg"
    good = frame.read_bytes()
    frame.write_bytes(b"not an image")  # unreadable header: found before any work
    assert_refused(*run(pr, propagate_argv("davis", root, checkpoint, out), capsys), frame, folder=out, before=None)
    frame.write_bytes(good[:len(good) // 3])  # truncated: found when decoded; nothing half-written is kept
    status, err = run(pr, propagate_argv("davis", root, checkpoint, out), capsys)
    assert_refused(status, err, frame)
    assert not (out / "seq").exists() and not [p for p in out.iterdir() if p.name.startswith(".seq")]
    # evaluate.py as a process: torch-free and quick
    for argv, name in [(evaluate_argv("davis", tmp_path / "nowhere", out), tmp_path / "nowhere"),
                       (evaluate_argv("davis", root, tmp_path / "no_pred"), tmp_path / "no_pred")]:
        done = subprocess.run([sys.executable, "evaluate.py", *argv], cwd=ROOT, capture_output=True, text=True)
        assert_refused(done.returncode, done.stderr, name)
        assert len(done.stderr.strip().splitlines()) == 1


def test_rerun_with_other_checkpoint_contents_or_settings_is_refused(tmp_path, capsys, checkpoint):
    root = make_davis(tmp_path / "DAVIS")
    out = tmp_path / "out"
    argv = propagate_argv("davis", root, checkpoint, out)
    assert run(pr, argv, capsys)[0] == 0
    recorded = json.loads((out / "propagation.json").read_text())
    assert recorded["checkpoint_sha256"] == common.file_sha256(checkpoint)
    before = snapshot(out)
    # same contents under another name: resumes (nothing to do)
    shutil.copy(checkpoint, tmp_path / "copy.pth")
    assert run(pr, propagate_argv("davis", root, tmp_path / "copy.pth", out), capsys)[0] == 0
    assert snapshot(out) == before
    # other contents at the same path, other protocol values, other heads: refused, listing what differs
    tiny_checkpoint(checkpoint, seed=1)
    assert_refused(*run(pr, argv, capsys), out / "propagation.json", "checkpoint_sha256", folder=out, before=before)
    tiny_checkpoint(checkpoint, seed=0)
    for extra, words in [(["--radius", "3"], "radius: 20 -> 3.0"), (["--queue-length", "0"], "queue_length: 20 -> 0"),
                         (["--input-size", "48", "64"], "input_size"), (["--num-heads", "2"], "encoder")]:
        assert_refused(*run(pr, argv + extra, capsys), "propagation.json", words, folder=out, before=before)


def test_full_disk_is_one_line_and_leaves_no_partial_files(tmp_path, capsys, checkpoint, monkeypatch):
    root = make_davis(tmp_path / "DAVIS")
    out = tmp_path / "out"
    real_save = Image.Image.save

    def full(self, fp, *args, **kwargs):
        if ".tmp" in str(fp) and "00002" in str(fp):
            real_save(self, fp, *args, **kwargs)  # the temporary is half written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", full)
    status, err = run(pr, propagate_argv("davis", root, checkpoint, out), capsys)
    assert_refused(status, err, "00002.png", "No space left")
    assert sorted(p.name for p in out.iterdir()) == ["propagation.json"]  # no video folder, no temporaries
    monkeypatch.undo()
    assert run(pr, propagate_argv("davis", root, checkpoint, out), capsys)[0] == 0  # the rerun finishes
    before = snapshot(out)

    def full_csv(path, rows, summary_row):
        raise OSError(errno.ENOSPC, f"{path}: no space left on device")
    monkeypatch.setattr(ev, "write_csv", full_csv)
    status, err = run(ev, evaluate_argv("davis", root, out), capsys)
    assert_refused(status, err, "davis_scores.csv", "no space left", folder=out, before=before)


# -----------------------------------------------------------------------------
# Concurrent and killed runs
# -----------------------------------------------------------------------------

def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_are_per_process_and_killed_writers_leftovers_are_removed(tmp_path, capsys, checkpoint):
    names = []
    common.atomic_write(tmp_path / "a.png", lambda tmp: (names.append(tmp.name), tmp.write_bytes(b"x")))
    assert names == [common.temporary_path(tmp_path / "a.png").name]  # one pattern, one sweep for both sides
    assert names == [f".a.png.{socket.gethostname()}-{os.getpid()}.tmp"]
    root = make_davis(tmp_path / "DAVIS")
    out = tmp_path / "out"
    host, dead, alive = socket.gethostname(), dead_pid(), os.getpid()
    leftovers = [out / f".propagation.json.{host}-{dead}.tmp", out / f"visualize/.seq.png.{host}-{dead}.tmp",
                 out / f"visualize/.seq.png.tmp{dead}", out / f".seq.{host}-{dead}.partial/00001.png"]
    kept = [out / f"visualize/.other.png.{host}-{alive}.tmp", out / f".seq.otherhost-{dead}.partial/x.png"]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert run(pr, propagate_argv("davis", root, checkpoint, out, "--visualize"), capsys)[0] == 0
    assert not any(p.exists() for p in leftovers) and not (out / f".seq.{host}-{dead}.partial").exists()
    assert all(p.exists() for p in kept)  # a live writer's, another host's
    assert (out / "seq/00003.png").exists() and (out / "visualize/seq.png").exists()


def test_a_video_finished_meanwhile_by_another_process_is_kept(tmp_path, capsys, checkpoint, monkeypatch):
    root = make_davis(tmp_path / "DAVIS")
    out = tmp_path / "out"
    write = pr.write_segmentation_pngs

    def and_another_process_finishes(dataset, soft, values, size, frames, annotations, folder, on_frame=None):
        write(dataset, soft, values, size, frames, annotations, folder, on_frame)
        (out / "seq").mkdir()  # the other writer renames its complete folder into place first
        (out / "seq/theirs").write_bytes(b"")
    monkeypatch.setattr(pr, "write_segmentation_pngs", and_another_process_finishes)
    assert run(pr, propagate_argv("davis", root, checkpoint, out), capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["propagation.json", "seq"]
    assert os.listdir(out / "seq") == ["theirs"]  # theirs kept whole, ours dropped, no partial folder left


def test_modules_passed_from_python_are_fingerprinted_by_their_weights(tmp_path):
    root = make_davis(tmp_path / "DAVIS")
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=1).eval()
    vit.register_buffer("steps", torch.tensor(3))  # a 0-d buffer, as BatchNorm's counter
    kwargs = dict(input_size=(H, W), device="cpu", progress=False)
    assert pr.propagate_dataset("davis", root, vit, tmp_path / "out", **kwargs)["written"] == ["seq"]
    assert pr.propagate_dataset("davis", root, vit, tmp_path / "out", **kwargs)["skipped"] == ["seq"]
    vit.steps += 1
    with pytest.raises(common.InputError, match="checkpoint_sha256"):
        pr.propagate_dataset("davis", root, vit, tmp_path / "out", **kwargs)
