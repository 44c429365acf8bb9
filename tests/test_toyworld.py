"""The toy world's ground truth is right: masks are what was drawn, keypoints lie on their
figure, files have the real datasets' layouts and decode to the intended labels, and
everything is a function of the seed."""

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import cdgmae  # noqa: E402
import toyworld as tw  # noqa: E402


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


# -----------------------------------------------------------------------------
# The renderer
# -----------------------------------------------------------------------------

def test_an_ellipse_lands_where_camera_and_pose_put_it():
    # One ellipse (semi-axes 10 x 5 px, object turned 30 deg, scale 1.5) seen by a camera
    # turned 15 deg with zoom 0.8, centred on world (50, 40). Worked out by hand: the
    # object centre (60, 40) appears at 0.8 * R(15 deg) (10, 0) + (48, 32) = (55.73, 34.07);
    # the ellipse has semi-axes 12 x 6 px, turned 45 deg in the image.
    obj = tw.sample_rigid(np.random.default_rng(0), 10.0, kinds=["ellipse"])
    obj["shape"].update(rx=10.0, ry=5.0)
    obj.update(pos=[60.0, 40.0], angle=math.radians(30), scale=1.5, deform=0.0)
    scene = {"background": tw.sample_background(np.random.default_rng(1)), "objects": [obj],
             "camera": {"pos": [50.0, 40.0], "angle": math.radians(15), "zoom": 0.8},
             "light": tw.sample_light(np.random.default_rng(2))}
    _, ids, _ = tw.render_scene(scene, 64, 96)
    ys, xs = np.mgrid[0:64, 0:96]
    cx, cy = 48 + 0.8 * 10 * math.cos(math.radians(15)), 32 + 0.8 * 10 * math.sin(math.radians(15))
    c, s = math.cos(math.radians(45)), math.sin(math.radians(45))
    u, v = c * (xs - cx) + s * (ys - cy), -s * (xs - cx) + c * (ys - cy)
    expected = (u / 12) ** 2 + (v / 6) ** 2 <= 1
    # pixel centres inside an ellipse: the area up to about the square root of the perimeter (60 px): ~8 of 226
    assert expected.sum() == pytest.approx(math.pi * 12 * 6, rel=0.05)
    # The renderer rounds a centre's ellipse coordinates to float32: a pixel changes side only if its centre lies
    # within that rounding (~1e-6 px) of the rim, which at most a couple of centres of this ellipse do.
    assert (ids.astype(bool) != expected).sum() <= 2


# Bags 0, 3 and 12 of seed 7 hold rigid and articulated objects and a figure.
@pytest.mark.parametrize("index", [0, 3, 12])
def test_bag_masks_are_the_pixels_each_object_drew(index):
    # Every view of a bag: a pixel with id k has exactly the colour of object k drawn alone;
    # id 0 pixels are exactly the background drawn alone; a pixel object k covers when drawn
    # alone shows k or an object drawn after it (in front).
    scenes = tw.sample_bag(seed=7, index=index, num_views=4, size=64)
    for scene in scenes:
        image, ids, _ = tw.render_scene(scene, 64, 64)
        background, _, _ = tw.render_scene(scene, 64, 64, only=[])
        assert np.array_equal(image[ids == 0], background[ids == 0])
        for k in range(len(scene["objects"])):
            alone, alone_ids, _ = tw.render_scene(scene, 64, 64, only=[k])
            mine = ids == k + 1
            assert np.array_equal(image[mine], alone[mine])
            assert (alone_ids[mine] == k + 1).all()
            hidden = (alone_ids == k + 1) & ~mine
            assert (ids[hidden] > k + 1).all()


def test_the_tested_bags_hold_every_kind_of_object():
    kinds = {obj["kind"] for index in (0, 3, 12) for obj in tw.sample_bag(7, index, 0, 64)[0]["objects"]}
    assert kinds == {"rigid", "articulated", "figure"}


def test_views_keep_identities_and_change_locally():
    # Sec. 3.1: a view shows the same objects (same textures, same ids) at other poses.
    scenes = tw.sample_bag(seed=3, index=0, num_views=4, size=64)
    real = scenes[0]
    for view in scenes[1:]:
        assert len(view["objects"]) == len(real["objects"])
        for a, b in zip(real["objects"], view["objects"]):
            assert a["kind"] == b["kind"]
            assert (a.get("texture") or a["textures"]) == (b.get("texture") or b["textures"])
            assert a["pos"] != b["pos"]
        assert view["camera"] != real["camera"] and view["light"] != real["light"]
    # sampling views leaves the real scene untouched
    again = tw.sample_bag(seed=3, index=0, num_views=0, size=64)[0]
    assert again == real


# -----------------------------------------------------------------------------
# Bags on disk
# -----------------------------------------------------------------------------

def test_bags_have_the_trainers_layout_and_true_masks(tmp_path):
    root, gt = tmp_path / "bags", tmp_path / "bags_gt"
    names = tw.write_bags(root, num_bags=3, num_views=2, size=64, seed=5, gt_output=gt, progress=False)
    bags = common.find_bags(root)
    assert bags == names == ["scene_000000", "scene_000001", "scene_000002"]
    assert common.check_bags(root, bags, num_views=2, min_views=3) == {}
    assert all(not name.startswith(".") for name in files_under(root) + files_under(gt))  # no temporary files
    for i, bag in enumerate(bags):
        real, views = common.bag_files(root / bag)
        assert [os.path.basename(p) for p in [real] + views] == ["real.jpg", "view_00.jpg", "view_01.jpg"]
        for scene, path in zip(tw.sample_bag(5, i, 2, 64), [real] + views):
            image, ids, _ = tw.render_scene(scene, 64, 64)
            mask = Image.open(gt / bag / (Path(path).stem + ".png"))
            assert mask.mode == "P"
            assert np.array_equal(np.asarray(mask), ids)
            jpeg = np.asarray(Image.open(path), dtype=np.float32)
            # the JPEG shows the same render: quality 95 quantises with steps of 1-10 levels (the standard
            # tables x 0.1), ~3 levels on average on this noisy render; another render is tens of levels away
            assert np.abs(jpeg - image * 255).mean() < 5
    target, anchors, _, _ = cdgmae.BagDataset(root, bags, num_views=2, num_anchors=2, input_size=64,
                                              num_patches=64)[(0, 1)]
    assert target.shape == (3, 64, 64) and anchors.shape == (2, 3, 64, 64)


def test_ground_truth_folder_inside_the_bags_is_refused(tmp_path):
    with pytest.raises(ValueError, match="must not be inside"):
        tw.write_bags(tmp_path / "bags", 1, 1, 64, gt_output=tmp_path / "bags" / "gt", progress=False)


def test_rerun_skips_finished_bags_and_completes_a_broken_one(tmp_path):
    tw.write_bags(tmp_path, num_bags=2, num_views=2, size=64, seed=1, progress=False)
    before = {p: (tmp_path / p).read_bytes() for p in files_under(tmp_path)}
    (tmp_path / "scene_000001" / "real.jpg").unlink()  # a run killed before the last write
    (tmp_path / "scene_000000" / "view_00.jpg").write_bytes(b"kept: finished bags are not redone")
    tw.write_bags(tmp_path, num_bags=2, num_views=2, size=64, seed=1, progress=False)
    assert (tmp_path / "scene_000001" / "real.jpg").read_bytes() == before["scene_000001/real.jpg"]
    assert (tmp_path / "scene_000000" / "view_00.jpg").read_bytes().startswith(b"kept")


# -----------------------------------------------------------------------------
# Toy DAVIS, VIP and JHMDB
# -----------------------------------------------------------------------------

# The PASCAL VOC colour map of the DAVIS annotations (first entries and the void colour).
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
               5: (128, 0, 128), 8: (64, 0, 0), 255: (224, 224, 192)}


def test_davis_layout_and_palette_pngs_decode_to_the_targets(tmp_path):
    names = tw.write_davis(tmp_path, num_videos=2, frames=4, height=64, width=96, seed=2, progress=False)
    assert (tmp_path / "ImageSets/2017/val.txt").read_text().split() == names
    for i, name in enumerate(names):
        frames = sorted(os.listdir(tmp_path / "JPEGImages/480p" / name))
        annotations = sorted(os.listdir(tmp_path / "Annotations/480p" / name))
        assert frames == [f"{t:05d}.jpg" for t in range(4)] and annotations == [f"{t:05d}.png" for t in range(4)]
        scenes, targets = tw.sample_video(2, "davis", i, 4, 64, 96)
        for t, scene in enumerate(scenes):
            png = Image.open(tmp_path / "Annotations/480p" / name / annotations[t])
            assert png.mode == "P" and Image.open(tmp_path / "JPEGImages/480p" / name / frames[t]).size == (96, 64)
            palette = np.asarray(png.getpalette(), np.uint8).reshape(-1, 3)
            assert all(tuple(palette[k]) == rgb for k, rgb in VOC_COLOURS.items())
            ids = np.asarray(png)
            _, drawn, _ = tw.render_scene(scene, 64, 96)
            for k, index in enumerate(targets):  # target k is id k+1 ...
                assert np.array_equal(ids == k + 1, drawn == index + 1)
            others = [j + 1 for j in range(len(scene["objects"])) if j not in targets]
            assert (ids[np.isin(drawn, others)] == 0).all()  # ... distractors are background
            if t == 0:
                assert set(np.unique(ids)) == set(range(len(targets) + 1))


def test_davis_distractors_share_a_targets_colours_but_not_its_texture():
    def colours_close(a, b, jitter=0.04 + 1e-9):  # the same pair of colours, in either order
        a, b = np.asarray(a), np.asarray(b)
        return min(np.abs(a - b).max(), np.abs(a - b[::-1]).max()) <= jitter

    for index in range(3):
        scenes, targets = tw.sample_video(0, "davis", index, 3, 96, 160)
        objects = scenes[0]["objects"]
        sources = [objects[k]["texture"] if objects[k]["kind"] != "figure" else objects[k]["textures"]["torso"]
                   for k in targets]
        distractors = [obj for j, obj in enumerate(objects) if j not in targets]
        assert distractors
        for obj in distractors:
            twins = [s for s in sources if colours_close(s["colors"], obj["texture"]["colors"])]
            assert twins and all(s["kind"] != obj["texture"]["kind"] for s in twins)


def test_vip_layout_and_class_pngs(tmp_path):
    names = tw.write_vip(tmp_path, num_videos=2, frames=3, height=64, width=96, seed=4, progress=False)
    assert names == ["videos1", "videos2"]
    assert (tmp_path / "lists/val_videos.txt").read_text().split() == names
    for i, name in enumerate(names):
        stems = [f"{t:012d}" for t in range(1, 4)]
        assert sorted(os.listdir(tmp_path / "Images" / name)) == [s + ".jpg" for s in stems]
        scenes, figures = tw.sample_video(4, "vip", i, 3, 64, 96)
        for scene, stem in zip(scenes, stems):
            classes = np.asarray(Image.open(tmp_path / "Annotations/Category_ids" / name / f"{stem}.png"))
            humans = np.asarray(Image.open(tmp_path / "Annotations/Human_ids" / name / f"{stem}.png"))
            assert classes.max() < len(tw.VIP_CLASSES) == 20
            assert np.array_equal(classes > 0, humans > 0)  # every figure pixel has a part class
            _, ids, drawn_classes = tw.render_scene(scene, 64, 96)
            on_figures = np.isin(ids, [f + 1 for f in figures])
            assert np.array_equal(classes, np.where(on_figures, drawn_classes, 0))
            assert set(np.unique(humans)) <= set(range(len(figures) + 1))
        first = np.asarray(Image.open(tmp_path / "Annotations/Category_ids" / name / f"{stems[0]}.png"))
        assert {tw.VIP["face"], tw.VIP["pants"], tw.VIP["right-arm"], tw.VIP["left-arm"]} <= set(np.unique(first))


def test_upright_figure_has_jhmdbs_joint_order():
    # JHMDB joints: neck, belly, face, right/left shoulder, hip, elbow, knee, wrist, ankle,
    # for a person facing the camera: the right side on the image's left, face above neck
    # above belly, knees above ankles.
    figure = tw.sample_figure(np.random.default_rng(0), 60.0)
    figure["joints"] = [0.0] * len(tw.FIGURE_POSE)
    xy = dict(zip(tw.JHMDB_JOINTS, tw.figure_skeleton(figure)[0]))
    for part in ("shoulder", "hip", "elbow", "knee", "wrist", "ankle"):
        assert xy[f"right {part}"][0] < xy["neck"][0] < xy[f"left {part}"][0]
    assert xy["face"][1] < xy["neck"][1] < xy["belly"][1] < xy["right hip"][1] < xy["right knee"][1] < xy["right ankle"][1]
    assert xy["right shoulder"][1] < xy["right elbow"][1] < xy["right wrist"][1]


def test_joint_pixels_match_the_drawn_figure():
    # An upright, symmetric figure 60 px tall, scale 1.25, seen at zoom 0.8 (so 60 px on
    # screen): its drawing is symmetric about the neck's column, its lowest pixels are the
    # feet (ellipses of half-height 0.04 * 60 = 2.4 px at the ankles) and its highest the
    # hair (reaching 1.1 head radii = 1.1 * 0.075 * 60 = 4.95 px above the face joint).
    figure = tw.sample_figure(np.random.default_rng(1), 60.0)
    figure.update(pos=[70.0, 50.0], scale=1.25, joints=[0, 0, 0.6, 0.3, 0.6, 0.3, 0.2, 0.1, 0.2, 0.1])
    scene = {"background": tw.sample_background(np.random.default_rng(2)), "objects": [figure],
             "camera": {"pos": [64.0, 48.0], "angle": 0.0, "zoom": 0.8},
             "light": tw.sample_light(np.random.default_rng(3))}
    joints = dict(zip(tw.JHMDB_JOINTS, tw.figure_joints_pixels(scene, 0, 96, 128)))
    _, ids, _ = tw.render_scene(scene, 96, 128)
    rows, cols = np.nonzero(ids == 1)
    # pixel centres of a drawing symmetric about the neck's column: mean and extremes within a pixel's
    # rounding of the drawn shape (0.5 px for the mean of a symmetric set, 1 px for an extreme)
    assert cols.mean() == pytest.approx(joints["neck"][0], abs=0.5)
    assert cols.min() + cols.max() == pytest.approx(2 * joints["neck"][0], abs=1.0)
    assert rows.max() == pytest.approx(joints["left ankle"][1] + 2.4, abs=1.0)
    assert rows.min() == pytest.approx(joints["face"][1] - 4.95, abs=1.0)


def test_jhmdb_keypoints_lie_on_the_figure(tmp_path):
    videos = tw.write_jhmdb(tmp_path, num_videos=3, frames=6, height=96, width=128, seed=6, progress=False)
    for i, (action, vid) in enumerate(videos):
        assert action in tw.JHMDB_ACTIONS
        assert f"{vid}.avi 2" in (tmp_path / "splits" / f"{action}_test_split1.txt").read_text().splitlines()
        assert sorted(os.listdir(tmp_path / "Rename_Images" / action / vid)) == [f"{t:05d}.png" for t in range(1, 7)]
        mat = scipy.io.loadmat(tmp_path / "joint_positions" / action / vid / "joint_positions.mat")
        assert {"pos_img", "pos_world", "scale", "viewpoint"} <= set(mat)
        pos = mat["pos_img"]
        assert pos.shape == (2, 15, 6)
        mask = scipy.io.loadmat(tmp_path / "puppet_mask" / action / vid / "puppet_mask.mat")["part_mask"]
        assert mask.shape == (96, 128, 6)
        scenes, (figure,) = tw.sample_video(6, "jhmdb", i, 6, 96, 128)
        for t, scene in enumerate(scenes):
            # pos_img is 1-based: pixel (row 0, column 0) is (x, y) = (1, 1)
            assert np.allclose(pos[:, :, t] - 1, tw.figure_joints_pixels(scene, figure, 96, 128).T)  # float64, +1
            # 1-based (x, y) -> 0-based (row, column)
            cols, rows = np.round(pos[0, :, t] - 1).astype(int), np.round(pos[1, :, t] - 1).astype(int)
            assert ((0 <= cols) & (cols < 128) & (0 <= rows) & (rows < 96)).all()
            assert mask[rows, cols, t].all()
            _, ids, _ = tw.render_scene(scene, 96, 128)  # and on the figure as drawn in the frame
            assert np.array_equal(mask[:, :, t] == 1, ids == figure + 1)
            frame = np.asarray(Image.open(tmp_path / "Rename_Images" / action / vid / f"{t + 1:05d}.png"))
            assert frame.shape == (96, 128, 3)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def write(folder, seed):
        tw.write_bags(folder / "bags", 2, 2, 64, seed, progress=False)
        tw.write_davis(folder / "davis", 1, 3, 64, 96, seed, progress=False)
        tw.write_vip(folder / "vip", 1, 3, 64, 96, seed, progress=False)
        tw.write_jhmdb(folder / "jhmdb", 1, 3, 96, 128, seed, progress=False)
        return {p: (folder / p).read_bytes() for p in files_under(folder)}

    a, b, c = write(tmp_path / "a", 0), write(tmp_path / "b", 0), write(tmp_path / "c", 1)
    assert a == b
    images = [p for p in a if p.endswith((".jpg", ".png"))]
    assert all(a[p] != c.get(p) for p in images)


def test_bad_flags_fail_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="file: not a folder"):  # one line, no traceback
        tw.main(["davis", "--output", str(tmp_path / "file")])
    for argv, flag in [(["davis", "--output", str(tmp_path / "d"), "--frames", "2"], "--frames"),
                       (["bags", "--output", str(tmp_path / "b"), "--num-bags", "0"], "--num-bags")]:
        with pytest.raises(SystemExit) as stop:
            tw.main(argv)
        assert stop.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "b").exists()
