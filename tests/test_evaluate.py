"""Metrics and file formats of the benchmarks (evaluate.py), against values worked out by hand."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluate as ev  # noqa: E402


def square(shape=(10, 10), top=2, left=2, side=4):
    mask = np.zeros(shape, bool)
    mask[top:top + side, left:left + side] = True
    return mask


# -----------------------------------------------------------------------------
# File formats
# -----------------------------------------------------------------------------

def test_palette_is_the_davis_colour_map():
    palette = ev.davis_palette()
    assert palette[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert palette[8].tolist() == [64, 0, 0]
    assert palette[255].tolist() == [224, 224, 192]  # the colour of void


def test_palette_png_round_trip(tmp_path):
    ids = np.array([[0, 1, 2], [3, 255, 1]], np.uint8)
    ev.write_palette_png(tmp_path / "00001.png", ids)
    image = Image.open(tmp_path / "00001.png")
    assert image.mode == "P" and image.getpalette()[3:9] == [128, 0, 0, 0, 128, 0]
    assert np.array_equal(ev.read_label_png(tmp_path / "00001.png"), ids)
    assert [p.name for p in tmp_path.iterdir()] == ["00001.png"]  # no temporary file left


def test_class_id_png_round_trip(tmp_path):
    ids = np.array([[0, 7, 19], [13, 0, 2]], np.uint8)
    ev.write_class_png(tmp_path / "a.png", ids)
    image = Image.open(tmp_path / "a.png")
    assert image.mode == "L" and np.array_equal(np.array(image), ids)  # the value itself, no palette
    assert np.array_equal(ev.read_label_png(tmp_path / "a.png"), ids)


def test_jhmdb_mat_round_trip(tmp_path):
    pos = np.zeros((2, 15, 3))
    pos[0, 4, 2], pos[1, 4, 2] = 11.0, 21.0  # MATLAB's 1-based (x, y) of joint 4 in frame 2
    sio.savemat(tmp_path / "joint_positions.mat", {"pos_img": pos})
    xy = ev.read_joints_mat(tmp_path / "joint_positions.mat")
    assert xy.shape == (3, 15, 2) and xy[2, 4].tolist() == [10.0, 20.0] and xy[0, 0].tolist() == [-1.0, -1.0]
    xy[1, 3] = np.nan
    ev.write_joints_mat(tmp_path / "out.mat", xy)
    back = sio.loadmat(tmp_path / "out.mat")["pos_img"]
    assert back.shape == (2, 15, 3) and back[:, 4, 2].tolist() == [11.0, 21.0] and np.isnan(back[:, 3, 1]).all()


def test_video_lists_accept_cropmaes_two_column_format(tmp_path):
    (tmp_path / "davis.txt").write_text("data/DAVIS/JPEGImages/480p/bike-packing data/DAVIS/Annotations/480p/bike-packing\n")
    (tmp_path / "jhmdb.txt").write_text(
        "j/joint_positions/golf/vid_1/joint_positions.mat j/Rename_Images/golf/vid_1\n\nclap/vid_2\n")
    assert ev.read_video_list(tmp_path / "davis.txt", "davis") == ["bike-packing"]
    assert ev.read_video_list(tmp_path / "jhmdb.txt", "jhmdb") == ["golf/vid_1", "clap/vid_2"]


# -----------------------------------------------------------------------------
# Region similarity J
# -----------------------------------------------------------------------------

def test_j_of_a_square_shifted_by_one_pixel():
    # 4x4 squares overlapping in 4x3 = 12 pixels; union 16 + 16 - 12 = 20
    assert ev.region_similarity(square(), square(left=3)) == pytest.approx(12 / 20)


def test_j_leaves_void_pixels_out():
    void = np.zeros((10, 10), bool)
    void[:, 2] = True  # the ground-truth column the prediction misses
    assert ev.region_similarity(square(), square(left=3), void) == pytest.approx(12 / 16)


def test_j_of_empty_masks():
    empty = np.zeros((10, 10), bool)
    assert ev.region_similarity(empty, empty) == 1.0  # object absent and predicted absent
    assert ev.region_similarity(empty, square()) == 0.0


# -----------------------------------------------------------------------------
# Contour accuracy F
# -----------------------------------------------------------------------------

def test_boundary_pixels_differ_from_an_east_south_or_southeast_neighbour():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    expected = np.zeros((4, 4), bool)
    expected[0, 1] = expected[1, 0] = expected[1, 1] = True  # (0, 0) equals all three neighbours
    assert np.array_equal(ev.boundary_map(mask), expected)


def test_boundary_tolerance_is_ceil_of_0008_times_the_diagonal():
    # 200x200: 0.008 * 282.8 = 2.26 -> 3 pixels
    gt = np.zeros((200, 200), bool)
    gt[:, :100] = True
    for shift, expected in [(3, 1.0), (4, 0.0)]:
        pred = np.zeros((200, 200), bool)
        pred[:, :100 + shift] = True
        assert ev.contour_accuracy(gt, pred) == expected


def test_boundary_dilation_is_the_disk_x2_plus_y2_at_most_r2():
    # dilate_disk's docstring: skimage's disk(radius), i.e. offsets with x^2 + y^2 <= r^2
    for radius in (1, 2, 3, 5):
        point = np.zeros((15, 15), bool)
        point[7, 7] = True
        y, x = np.mgrid[-7:8, -7:8]
        assert np.array_equal(ev.dilate_disk(point, radius), x ** 2 + y ** 2 <= radius ** 2)


def test_f_of_a_partly_matching_boundary():
    # 20x20, tolerance ceil(0.226) = 1. Ground truth: columns 0..9, boundary = column 9 (20 px).
    # Prediction: the same in rows 0..9, columns 0..13 in rows 10..19; its boundary is column 9
    # in rows 0..9, row 9 columns 10..13 and column 13 in rows 10..19: 24 px.
    # Precision: rows 0..9 of column 9 and (9, 10) lie within 1 px of column 9 -> 11 / 24.
    # Recall: column 9 rows 0..10 lie within 1 px of the prediction's boundary -> 11 / 20.
    gt = np.zeros((20, 20), bool)
    gt[:, :10] = True
    pred = gt.copy()
    pred[10:, :14] = True
    p, r = 11 / 24, 11 / 20
    assert ev.contour_accuracy(gt, pred) == pytest.approx(2 * p * r / (p + r))  # = 0.5


def test_f_of_empty_masks():
    empty = np.zeros((20, 20), bool)
    assert ev.contour_accuracy(empty, empty) == 1.0
    assert ev.contour_accuracy(square((20, 20)), empty) == 0.0
    assert ev.contour_accuracy(empty, square((20, 20))) == 0.0


def test_f_clears_void_pixels_from_both_masks():
    gt = square((20, 20), 5, 5, 6)
    pred = gt.copy()
    pred[5:11, 11:15] = True  # 4 extra columns, all void
    void = np.zeros((20, 20), bool)
    void[:, 11:] = True
    assert ev.contour_accuracy(gt, pred) < 1.0
    assert ev.contour_accuracy(gt, pred, void) == 1.0


# -----------------------------------------------------------------------------
# VIP mIoU and JHMDB PCK
# -----------------------------------------------------------------------------

def test_miou_leaves_out_classes_absent_from_ground_truth_and_prediction():
    confusion = np.array([[3, 1, 0], [1, 5, 0], [0, 0, 0]])
    miou, iou = ev.mean_iou(confusion)
    assert iou[0] == pytest.approx(3 / 5) and iou[1] == pytest.approx(5 / 7) and np.isnan(iou[2])
    assert miou == pytest.approx((3 / 5 + 5 / 7) / 2)


def test_confusion_counts_rows_as_ground_truth_and_ignores_other_values():
    gt = np.array([[0, 1, 255], [1, 1, 0]])
    pred = np.array([[0, 0, 4], [1, 1, 1]])
    confusion = ev.confusion_matrix(gt, pred, num_classes=3)
    assert confusion.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]


def test_pck_normaliser_is_06_of_the_ground_truth_box_diagonal():
    gt = np.array([[[0.0, 0.0], [30.0, 40.0], [10.0, 10.0]]])  # box 30 x 40, diagonal 50 -> 30
    pred = gt.copy()
    pred[0, 2] += [3.0, 0.0]        # 3 / 30 = 0.1: correct at 0.1 (<=)
    pred[0, 1] += [0.0, 3.3]        # 0.11: wrong at 0.1, right at 0.2
    scores = ev.pck(pred, gt, alphas=(0.1, 0.2))
    assert scores[0.1] == pytest.approx(2 / 3) and scores[0.2] == 1.0


def test_pck_counts_only_joints_with_a_visible_prediction():
    gt = np.array([[[0.0, 0.0], [30.0, 40.0], [100.0, 100.0]]])
    pred = gt.copy()
    pred[0, 2] = np.nan  # not visible: neither scored nor part of the box (which stays 30 x 40)
    pred[0, 1] += [0.0, 3.0]  # 3 / 30 = 0.1
    assert ev.normalized_joint_distances(pred, gt)[0, 1] == pytest.approx(0.1)
    scores = ev.pck(pred, gt, alphas=(0.1,))
    assert scores[0.1] == 1.0  # mean over the two scored joints; joint 2 has no visible frame


def test_pck_averages_each_joint_over_frames_then_over_joints():
    gt = np.zeros((4, 3, 2))
    gt[:, 1] = [30.0, 40.0]
    gt[:, 2] = [30.0, 0.0]
    pred = gt.copy()
    pred[:3, 0] += [10.0, 0.0]  # joint 0: 10 / 30 off in frames 0-2, right in frame 3
    pred[3, 1] = np.nan         # joint 1: right in frames 0-2, not visible in frame 3
    # joint 0: 1 of 4, joint 1: 3 of 3, joint 2: 4 of 4 (frame 3's box is 30 x 0 -> 18)
    assert ev.pck(pred, gt, alphas=(0.1,))[0.1] == pytest.approx((1 / 4 + 1 + 1) / 3)


def test_pck_counts_a_zero_normaliser_as_wrong():
    # one visible joint: its box has no size, 0 / 0 is not <= alpha, yet the joint is counted
    gt = np.array([[[5.0, 5.0], [9.0, 9.0]]])
    pred = np.array([[[5.0, 5.0], [np.nan, np.nan]]])
    assert ev.pck(pred, gt, alphas=(0.2,))[0.2] == 0.0


# -----------------------------------------------------------------------------
# Dataset scorers
# -----------------------------------------------------------------------------

def write_davis_sequence(root, name, gt_frames, pred_frames):
    for t, (gt, pred) in enumerate(zip(gt_frames, pred_frames)):
        (root / "JPEGImages/480p" / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", gt.shape[::-1]).save(root / "JPEGImages/480p" / name / f"{t:05d}.jpg")
        ev.write_palette_png(root / "Annotations/480p" / name / f"{t:05d}.png", gt)
        ev.write_palette_png(root / "pred" / name / f"{t:05d}.png", pred)


def davis_fixture(root):
    """Sequence a: one object, 4 frames; frame 1 exact (J 1), frame 2 shifted by a pixel (J 0.6),
    frames 0 and 3 (not scored) predicted empty. Sequence b: two objects, 3 frames, so only
    frame 1 is scored: object 1 exact but its prediction covers 2 void pixels (J 16/18 with void
    as background, the official rule, 1 when void is left out); object 2 has left the scene
    and is predicted absent (J 1, F 1)."""
    one = square((20, 20)).astype(np.uint8)
    empty = np.zeros((20, 20), np.uint8)
    write_davis_sequence(root, "a", [one] * 4, [empty, one, square((20, 20), left=3).astype(np.uint8), empty])
    b0 = one.copy()
    b0[12:16, 12:16] = 2
    b1_gt, b1_pred = one.copy(), one.copy()
    b1_gt[6, 2:4] = 255
    b1_pred[6, 2:4] = 1
    write_davis_sequence(root, "b", [b0, b1_gt, b0], [b0, b1_pred, b0])
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "ImageSets/2017/val.txt").write_text("a\nb\n")


def test_davis_scores_frames_1_to_T2_and_averages_over_objects(tmp_path):
    davis_fixture(tmp_path)
    summary = ev.evaluate_dataset("davis", tmp_path, tmp_path / "pred", progress=False)
    rows = {r["sequence"]: r for r in summary["rows"]}
    assert rows["a_1"]["J"] == pytest.approx(100 * 0.8) and rows["a_1"]["F"] == 100.0
    assert rows["b_1"]["J"] == pytest.approx(100 * 16 / 18)
    assert rows["b_2"]["J"] == 100.0 and rows["b_2"]["F"] == 100.0
    assert summary["J_m"] == pytest.approx(100 * (0.8 + 16 / 18 + 1) / 3)  # objects, not sequences
    assert summary["J&F_m"] == pytest.approx((summary["J_m"] + summary["F_m"]) / 2)


def test_davis_void_can_be_left_out(tmp_path):
    davis_fixture(tmp_path)
    summary = ev.evaluate_dataset("davis", tmp_path, tmp_path / "pred", exclude_void=True, progress=False)
    assert {r["sequence"]: r for r in summary["rows"]}["b_1"]["J"] == 100.0


def test_davis_prediction_with_an_unknown_object_is_an_error(tmp_path):
    davis_fixture(tmp_path)
    ev.write_palette_png(tmp_path / "pred/a/00001.png", square((20, 20)).astype(np.uint8) * 3)
    with pytest.raises(ValueError, match=r"pred/a/00001.png: prediction holds ids \{3\}; .* objects 1..1"):
        ev.evaluate_dataset("davis", tmp_path, tmp_path / "pred", progress=False)


def test_davis_missing_prediction_is_named(tmp_path):
    davis_fixture(tmp_path)
    (tmp_path / "pred/b/00001.png").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "pred/b/00001.png")):
        ev.evaluate_dataset("davis", tmp_path, tmp_path / "pred", progress=False)


def test_davis_missing_annotation_in_the_middle_is_named(tmp_path):
    davis_fixture(tmp_path)
    (tmp_path / "Annotations/480p/a/00002.png").unlink()
    with pytest.raises(FileNotFoundError, match="Annotations/480p/a/00002.png"):
        ev.davis_video(tmp_path, "a")


def test_vip_miou_pools_one_confusion_matrix_over_all_frames(tmp_path):
    # v1 frame 1: right; frame 2: gt all 1, left half predicted 0. v2: gt top half 2, all predicted 2.
    # pooled counts: (0,0) 8, (1,1) 16, (1,0) 8, (2,2) 8, (0,2) 8 -> IoU 8/24, 16/24, 8/16, others absent
    half = np.zeros((4, 4), np.uint8)
    half[:, 2:] = 1
    top = np.zeros((4, 4), np.uint8)
    top[:2] = 2
    frames = {"v1": [(half, half), (np.ones((4, 4), np.uint8), half)], "v2": [(top, np.full((4, 4), 2, np.uint8))]}
    for video, pairs in frames.items():
        (tmp_path / "Images" / video).mkdir(parents=True)
        for t, (gt, pred) in enumerate(pairs):
            Image.new("RGB", (4, 4)).save(tmp_path / "Images" / video / f"{t + 1:012d}.jpg")
            ev.write_class_png(tmp_path / "Annotations/Category_ids" / video / f"{t + 1:012d}.png", gt)
            small = Image.fromarray(pred).resize((2, 2), Image.NEAREST)  # read back with PIL nearest
            ev.write_class_png(tmp_path / "pred" / video / f"{t + 1:012d}.png", np.array(small))
    summary = ev.evaluate_dataset("vip", tmp_path, tmp_path / "pred", progress=False)
    assert summary["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert math.isnan(summary["IoU_sun-glasses"])  # class 3: in neither ground truth nor prediction


def test_vip_missing_annotation_is_named(tmp_path):
    (tmp_path / "Images/videos1").mkdir(parents=True)
    for t in (1, 2):
        Image.new("RGB", (4, 4)).save(tmp_path / f"Images/videos1/{t:012d}.jpg")
    ev.write_class_png(tmp_path / "Annotations/Category_ids/videos1/000000000001.png", np.zeros((4, 4)))
    with pytest.raises(FileNotFoundError, match="Category_ids/videos1/000000000002.png"):
        ev.vip_video(tmp_path, "videos1")


def write_jhmdb_video(root, name, gt_xy, frames):
    (root / "Rename_Images" / name).mkdir(parents=True)
    for t in range(frames):
        Image.new("RGB", (40, 30)).save(root / "Rename_Images" / name / f"{t + 1:05d}.png")
    (root / "joint_positions" / name).mkdir(parents=True)
    sio.savemat(root / "joint_positions" / name / "joint_positions.mat", {"pos_img": gt_xy.transpose(2, 1, 0) + 1})


def test_jhmdb_first_frame_is_not_scored(tmp_path):
    gt = np.zeros((3, 15, 2))
    gt[:, :, 0] = np.arange(15) * 2.0   # box 28 x 20 in every frame
    gt[:, :, 1] = np.arange(15) % 5 * 5.0
    write_jhmdb_video(tmp_path, "golf/v", gt, frames=3)
    pred = gt.copy()
    pred[0] += 100.0        # frame 0 far off: it is given, not scored
    pred[2, :5, 0] += 4.0   # 4 / (0.6 * 34.4) = 0.19: five joints wrong at 0.1 in frame 2
    ev.write_joints_mat(tmp_path / "pred/golf/v/joint_positions.mat", pred)
    summary = ev.evaluate_dataset("jhmdb", tmp_path, tmp_path / "pred", progress=False)
    assert summary["PCK@0.1"] == pytest.approx(100 * (5 * 0.5 + 10 * 1.0) / 15)
    assert summary["PCK@0.2"] == 100.0


def test_jhmdb_annotation_longer_than_the_video_is_named(tmp_path):
    write_jhmdb_video(tmp_path, "golf/v", np.zeros((5, 15, 2)), frames=4)
    with pytest.raises(ValueError, match="golf/v/joint_positions.mat: pos_img has 5 frames"):
        ev.jhmdb_video(tmp_path, "golf/v")


def test_jhmdb_default_list_is_the_test_videos_of_split_1(tmp_path):
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits/golf_test_split1.txt").write_text("a.avi 1\nb.avi 2\n")
    (tmp_path / "splits/clap_test_split1.txt").write_text("c.avi 2\n")
    assert ev.list_videos("jhmdb", tmp_path) == ["clap/c", "golf/b"]
