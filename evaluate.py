"""Scores of the label-propagation benchmarks (Sec. 4, A.1.2): DAVIS-2017 J&F, VIP mIoU, JHMDB PCK.

The paper evaluates "with the evaluation codebase released by CropMAE" (A.1.2). That
codebase scores DAVIS with the official davis2017-evaluation code, VIP and JHMDB with the
scripts inherited from CRW (videowalk). This file re-implements their conventions (read
from the public code, written anew) and says where each one comes from:

  DAVIS-2017 semi-supervised (official davis2017-evaluation, task "semi-supervised"):
    * objects are 1..max id of the first annotation; annotation value 255 (void) is set to
      background, and NO void mask is used by the official semi-supervised scorer
      (`exclude_void=True` excludes void pixels instead, as the unsupervised task does);
    * frames 1..T-2 are scored (the first and the last annotated frame are left out);
    * J: IoU, 1 when the union is empty;
    * F: boundary F-measure. Boundary pixels (seg2bmap) are those that differ from their
      east, south or south-east neighbour (on the last row only east, on the last column
      only south, never the corner); they match when within a disk of radius
      ceil(0.008 * sqrt(H^2 + W^2)) pixels (8 px at 480x854) of the other boundary;
      no boundary in both: 1; in only one: 0;
    * per object: mean over its frames; J-Mean / F-Mean: mean over every object of every
      sequence (object-weighted); J&F-Mean = their average.
  VIP (CRW's eval_vip.py): 20 classes (background included); one confusion matrix over every
    frame of every video, the first frame included; predictions of another size are resized
    to the annotation with PIL's nearest neighbour; mIoU = mean IoU over the classes whose
    union is not empty.
  JHMDB (CRW's eval_pck.py): the first frame is not scored; a joint counts in a frame when
    its PREDICTION is visible (the propagated heat map was not all zero); the normaliser of
    a frame is 0.6 x the diagonal of the box around the ground-truth joints that count in
    that frame; correct when distance / normaliser <= alpha; PCK = mean over the 15 joints
    of each joint's fraction correct over all frames of all videos.

Scores of the summaries are percentages (the paper's tables); the metric functions return
fractions in [0, 1].

Inputs are checked before they are scored, and a file that the official scripts would score
silently but wrongly is an error naming it (InputError or FileNotFoundError; the command
line prints one line `path: what is wrong (what to do)` and exits 1):
  * labels must be indexed ('P') or 8-bit single-channel ('L') PNGs of their frame's size;
  * DAVIS: the first frame's ids, void (255) aside, must be 0..K or 1..K with every object
    present and K <= DAVIS_MAX_OBJECTS (grey levels such as {0, 38, 75, 113} fail; the
    official scorer would count 113 objects); later annotations hold only 0..K and 255 (the
    official scorer ignores other ids), predictions only 0..K (the official scorer stops on
    a higher one, 255 included, with exit status 0);
  * VIP: annotations and predictions hold only the classes 0..19 (VIP defines no void
    value; CRW's fast_hist drops other ground-truth values without a word);
  * JHMDB: pos_img is 2x15xT with T = the number of frames (annotation, finite) or of the
    annotation (prediction; NaN = not visible, no infinities);
  * a video has a frame to score: DAVIS at least 3 frames (1..T-2 are scored), JHMDB at least
    2 (the official scorers would average no frame and print NaN).

What you may copy: the file imports no torch; with common.py (the plumbing every script shares)
beside it, it can be copied alone (numpy, scipy, Pillow; tqdm for progress bars). The scores
come first, and need neither common.py nor files:
`region_similarity` (J), `confusion_matrix` / `mean_iou` (VIP mIoU) and `joint_visibility` /
`normalized_joint_distances` / `pck` (JHMDB PCK) need only numpy arrays; `contour_accuracy`
(F, with `boundary_map` and `dilate_disk`) adds scipy.ndimage. Then the dataset scorers
(`evaluate_davis`, `evaluate_vip`, `evaluate_jhmdb`, `evaluate_dataset`), which use the
plumbing after them: the file formats (label PNGs, joint_positions.mat), the
dataset layouts and checks, and the command line.

Usage:
    python evaluate.py --dataset davis --data-root DAVIS --predictions runs/davis
    python evaluate.py --dataset vip   --data-root VIP_Fine --predictions runs/vip
    python evaluate.py --dataset jhmdb --data-root JHMDB --predictions runs/jhmdb

Import:
    from evaluate import evaluate_dataset, region_similarity, contour_accuracy, pck, mean_iou
    summary = evaluate_dataset("davis", "DAVIS", "runs/davis")   # {"J&F_m": ..., "J_m": ..., ...}
"""
import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import io as sio
from scipy import ndimage

from common import (HelpFormatter, InputError, UnreadableImage, atomic_write, check_output_path,
                    checked, exit_on_expected_errors, format_table, list_files, open_image, run_command, write_csv)

DATASETS = ("davis", "vip", "jhmdb")
VIP_NUM_CLASSES = 20
VIP_CLASSES = ["background", "hat", "hair", "sun-glasses", "upper-clothes", "dress", "coat",
               "socks", "pants", "gloves", "scarf", "skirt", "torso-skin", "face", "right-arm",
               "left-arm", "right-leg", "left-leg", "right-shoe", "left-shoe"]
JHMDB_JOINTS = ["neck", "belly", "face", "right shoulder", "left shoulder", "right hip", "left hip",
                "right elbow", "left elbow", "right knee", "left knee", "right wrist", "left wrist",
                "right ankle", "left ankle"]
DAVIS_VOID = 255
DAVIS_MAX_OBJECTS = 100  # more first-frame ids than this is not an object annotation (DAVIS-2017: <= 10)
LABEL_MODES = ("P", "L")  # indexed or 8-bit single-channel PNG: the stored value is the id


# -----------------------------------------------------------------------------
# The scores on numpy arrays: J and F (DAVIS), mIoU (VIP), PCK (JHMDB)
# -----------------------------------------------------------------------------


def region_similarity(gt, pred, void=None):
    """J, the Jaccard index of binary masks [..., H, W] (one value per leading index).

    Pixels where `void` is true count in neither intersection nor union; an empty union
    gives 1 (an object correctly predicted absent)."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    keep = ~np.asarray(void, bool) if void is not None else np.ones_like(gt)
    inter = (gt & pred & keep).sum(axis=(-2, -1))
    union = ((gt | pred) & keep).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def boundary_map(mask):
    """seg2bmap: [H, W] bool -> the pixels that differ from their east, south or south-east
    neighbour; on the last row only the east neighbour counts, on the last column only the
    south one, and the bottom-right pixel is never a boundary."""
    mask = np.asarray(mask, bool)
    east, south, south_east = np.zeros_like(mask), np.zeros_like(mask), np.zeros_like(mask)
    east[:, :-1] = mask[:, 1:]
    south[:-1, :] = mask[1:, :]
    south_east[:-1, :-1] = mask[1:, 1:]
    boundary = (mask ^ east) | (mask ^ south) | (mask ^ south_east)
    boundary[-1, :] = mask[-1, :] ^ east[-1, :]
    boundary[:, -1] = mask[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def dilate_disk(boundary, radius):
    """Binary dilation by a disk {x^2 + y^2 <= radius^2} (skimage's disk(radius)), computed as
    'Euclidean distance to the nearest true pixel <= radius'."""
    if not boundary.any():
        return np.zeros_like(boundary)
    return ndimage.distance_transform_edt(~boundary) <= radius


def contour_accuracy(gt, pred, void=None, bound_th=0.008):
    """F, the boundary F-measure of binary masks [H, W] (or [T, H, W] -> [T]).

    Tolerance: bound_th pixels if >= 1, else ceil(bound_th * image diagonal). Void pixels
    are cleared from both masks before their boundaries are taken."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    if gt.ndim == 3:
        return np.array([contour_accuracy(g, p, None if void is None else void[i], bound_th)
                         for i, (g, p) in enumerate(zip(gt, pred))])
    if void is not None:
        gt, pred = gt & ~np.asarray(void, bool), pred & ~np.asarray(void, bool)
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
    gt_boundary, pred_boundary = boundary_map(gt), boundary_map(pred)
    n_gt, n_pred = gt_boundary.sum(), pred_boundary.sum()
    if n_gt == 0 and n_pred == 0:
        return 1.0
    if n_gt == 0 or n_pred == 0:
        return 0.0
    precision = (pred_boundary & dilate_disk(gt_boundary, radius)).sum() / n_pred
    recall = (gt_boundary & dilate_disk(pred_boundary, radius)).sum() / n_gt
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def confusion_matrix(gt, pred, num_classes=VIP_NUM_CLASSES):
    """[num_classes, num_classes] pixel counts, rows = ground truth, columns = prediction.
    Ground-truth values outside 0..num_classes-1 are ignored (CRW's fast_hist)."""
    gt, pred = np.asarray(gt).astype(np.int64).ravel(), np.asarray(pred).astype(np.int64).ravel()
    keep = (gt >= 0) & (gt < num_classes)
    if (pred[keep] >= num_classes).any() or (pred[keep] < 0).any():
        raise ValueError(f"prediction holds a class id outside 0..{num_classes - 1}")
    counts = np.bincount(num_classes * gt[keep] + pred[keep], minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes)


def mean_iou(confusion):
    """(mIoU, per-class IoU [C]) of a confusion matrix; a class with an empty union (absent
    from both ground truth and prediction) has IoU NaN and is left out of the mean."""
    confusion = np.asarray(confusion, dtype=np.float64)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"), iou


def joint_visibility(pred_xy, visible=None):
    """[N, J] bool: the given mask, else "the predicted position is finite" (CRW decides
    visibility from the prediction: an all-zero propagated heat map)."""
    return np.isfinite(np.asarray(pred_xy, np.float64)).all(-1) if visible is None else np.asarray(visible, bool)


def normalized_joint_distances(pred_xy, gt_xy, visible=None):
    """Distances [N, J] between predicted and true joints, divided by 0.6 x the diagonal of
    the box around the frame's ground-truth joints that are visible; NaN where not visible.

    pred_xy, gt_xy [N, J, 2]; visible [N, J] bool (default: joint_visibility). As in CRW's
    eval_pck.py the box starts as (min x, min y) = (1e6, 1e6), (max x, max y) = (-1, -1), and a
    zero normaliser gives NaN (0 / 0) or inf, which no threshold accepts."""
    pred_xy, gt_xy = np.asarray(pred_xy, np.float64), np.asarray(gt_xy, np.float64)
    visible = joint_visibility(pred_xy, visible)
    low = np.minimum(np.where(visible[..., None], gt_xy, np.inf).min(axis=1), 1e6)     # [N, 2]
    high = np.maximum(np.where(visible[..., None], gt_xy, -np.inf).max(axis=1), -1.0)  # [N, 2]
    normaliser = 0.6 * np.linalg.norm(high - low, axis=-1)  # [N]
    with np.errstate(invalid="ignore", divide="ignore"):
        dist = np.linalg.norm(pred_xy - gt_xy, axis=-1) / normaliser[:, None]
    return np.where(visible, dist, np.nan)


def pck(pred_xy, gt_xy, alphas=(0.1, 0.2), visible=None):
    """Percentage of correct keypoints as fractions: {alpha: PCK}.

    pred_xy, gt_xy [N, J, 2] over N frames (of any videos); a visible joint is correct when
    its normalised distance (normalized_joint_distances) is <= alpha. Each joint's fraction
    is taken over the frames where it is visible, then averaged over the joints (a joint
    never visible is left out)."""
    visible = joint_visibility(pred_xy, visible)
    dist = normalized_joint_distances(pred_xy, gt_xy, visible)
    counts = visible.sum(0).astype(np.float64)
    scores = {}
    for alpha in alphas:
        with np.errstate(invalid="ignore"):
            correct = ((dist <= alpha) & visible).sum(0)
        per_joint = correct / np.where(counts > 0, counts, np.nan)
        scores[alpha] = float(np.nanmean(per_joint))
    return scores


# -----------------------------------------------------------------------------
# Dataset-level scorers
# -----------------------------------------------------------------------------

def evaluate_davis(data_root, predictions, videos, resolution="480p", exclude_void=False, progress=True):
    """Semi-supervised DAVIS-2017 scores. Predictions: <predictions>/<seq>/<frame>.png id maps
    (palette or grayscale) at annotation size. Returns (summary, rows): summary {"J&F_m",
    "J_m", "F_m"} in %, one row per object."""
    rows = []
    for seq in _progress(videos, progress, "davis"):
        frames, annotations = davis_video(data_root, seq, resolution, require_all=True)
        first, num_objects, size = check_segmentation_video("davis", frames, annotations)
        gt = np.stack([first] + [read_label_png(a, size) for a in annotations[1:]])  # checked above
        void = gt == DAVIS_VOID
        gt[void] = 0
        scored = list(range(1, len(frames) - 1))  # the first and the last frame are not scored
        pred = []
        for t in scored:
            path = Path(predictions) / seq / f"{annotations[t].stem}.png"
            if not path.exists():
                raise FileNotFoundError(f"{path}: prediction missing (run propagate.py, or check --predictions)")
            pred.append(read_label_png(path, size, "prediction"))
            davis_ids_check(path, pred[-1], num_objects, "prediction")
        pred = np.stack(pred) if pred else np.zeros((0,) + gt.shape[1:], np.uint8)
        for obj in range(1, num_objects + 1):
            v = void[scored] if exclude_void else None
            j = region_similarity(gt[scored] == obj, pred == obj, v)
            f = contour_accuracy(gt[scored] == obj, pred == obj, v)
            j_mean = float(np.mean(j)) if len(scored) else float("nan")
            f_mean = float(np.mean(f)) if len(scored) else float("nan")
            rows.append({"sequence": f"{seq}_{obj}", "J&F": 100 * (j_mean + f_mean) / 2,
                         "J": 100 * j_mean, "F": 100 * f_mean})
    j_m = float(np.nanmean([r["J"] for r in rows]))
    f_m = float(np.nanmean([r["F"] for r in rows]))
    return {"J&F_m": (j_m + f_m) / 2, "J_m": j_m, "F_m": f_m, "objects": len(rows)}, rows


def read_vip_prediction(path, size):
    """A VIP prediction [H, W] uint8 at the annotation's size (width, height): another size is
    resized with PIL's nearest neighbour, as CRW's eval_vip.py does; ids must be 0..19."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: prediction missing (run propagate.py, or check --predictions)")
    check_label_header(path, what="prediction")
    try:
        with Image.open(path) as image:
            if image.size != tuple(size):
                image = image.resize(tuple(size), Image.NEAREST)
            pred = np.array(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: cannot decode prediction ({e}) (replace the file)") from None
    vip_ids_check(path, pred, "prediction")
    return pred


def evaluate_vip(data_root, predictions, videos, progress=True):
    """VIP mIoU over 20 classes from one confusion matrix over all frames of all videos.
    Predictions: <predictions>/<video>/<frame>.png class ids. Returns (summary {"mIoU"} in %,
    one row per video with that video's own mIoU, for reading only)."""
    total = np.zeros((VIP_NUM_CLASSES, VIP_NUM_CLASSES), np.int64)
    rows = []
    for video in _progress(videos, progress, "vip"):
        frames, annotations = vip_video(data_root, video)
        _, _, size = check_segmentation_video("vip", frames, annotations)
        confusion = np.zeros_like(total)
        for annotation in annotations:
            gt = read_label_png(annotation, size)  # checked by check_segmentation_video
            pred = read_vip_prediction(Path(predictions) / video / f"{annotation.stem}.png", size)
            confusion += confusion_matrix(gt, pred)
        total += confusion
        rows.append({"video": video, "frames": len(frames), "mIoU": 100 * mean_iou(confusion)[0]})
    miou, per_class = mean_iou(total)
    summary = {"mIoU": 100 * miou, "videos": len(rows)}
    summary.update({f"IoU_{name}": 100 * float(v) for name, v in zip(VIP_CLASSES, per_class)})
    return summary, rows


def evaluate_jhmdb(data_root, predictions, videos, alphas=(0.1, 0.2), progress=True):
    """JHMDB PCK@alpha. Predictions: <predictions>/<class>/<video>/joint_positions.mat
    (pos_img [2, 15, T], 1-based, NaN = not visible). Returns (summary {"PCK@0.1", ...} in %,
    one row per video, for reading only)."""
    all_pred, all_gt, rows = [], [], []
    for video in _progress(videos, progress, "jhmdb"):
        _, _, gt = jhmdb_video(data_root, video)
        path = Path(predictions) / video / "joint_positions.mat"
        if not path.exists():
            raise FileNotFoundError(f"{path}: prediction missing (run propagate.py, or check --predictions)")
        pred = read_joints_mat(path, len(gt), what="prediction")
        pred, gt = pred[1:], gt[1:]  # the first frame is given, not scored
        all_pred.append(pred)
        all_gt.append(gt)
        scores = pck(pred, gt, alphas)
        rows.append({"video": video, **{f"PCK@{a}": 100 * scores[a] for a in alphas}})
    scores = pck(np.concatenate(all_pred), np.concatenate(all_gt), alphas)
    return {**{f"PCK@{a}": 100 * scores[a] for a in alphas}, "videos": len(rows)}, rows


def evaluate_dataset(dataset, data_root, predictions, list_file=None, videos=None,
                     resolution="480p", subset="val", exclude_void=False, progress=True, alphas=(0.1, 0.2)):
    """Score the predictions of one benchmark. Returns the summary dict (percentages) with
    the per-sequence rows under "rows". A file that cannot be scored raises InputError or
    FileNotFoundError naming it; no partial score is returned."""
    if videos is None:
        videos = list_videos(dataset, data_root, list_file, subset)
    if not Path(predictions).is_dir():
        raise FileNotFoundError(f"{predictions}: predictions folder not found (run propagate.py, or check --predictions)")
    if dataset == "davis":
        summary, rows = evaluate_davis(data_root, predictions, videos, resolution, exclude_void, progress)
    elif dataset == "vip":
        summary, rows = evaluate_vip(data_root, predictions, videos, progress)
    elif dataset == "jhmdb":
        summary, rows = evaluate_jhmdb(data_root, predictions, videos, alphas, progress=progress)
    else:
        raise InputError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")
    return {"dataset": dataset, **summary, "rows": rows}


def _progress(items, enabled, desc):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, leave=False)


# -----------------------------------------------------------------------------
# File formats: palette PNG (DAVIS), class-id PNG (VIP), joint_positions.mat (JHMDB)
# -----------------------------------------------------------------------------

def davis_palette():
    """The DAVIS / PASCAL VOC colour map, [256, 3] uint8: bit b of the index, for b = 0, 3, 6
    (red), 1, 4, 7 (green), 2, 5 (blue), goes to bit 7, 6, 5 of its channel. Index 1 is
    (128, 0, 0), 2 is (0, 128, 0), 3 is (128, 128, 0), 4 is (0, 0, 128)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value = index
        for shift in range(7, -1, -1):
            for channel in range(3):
                palette[index, channel] |= (value & 1) << shift
                value >>= 1
    return palette


def write_palette_png(path, ids):
    """ids [H, W] integers 0..255 -> an indexed ('P') PNG with the DAVIS palette."""
    image = Image.fromarray(np.asarray(ids, dtype=np.uint8), mode="P")
    image.putpalette(davis_palette().ravel().tolist())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_class_png(path, ids):
    """ids [H, W] integers 0..255 -> a grayscale ('L') PNG holding the ids themselves (VIP's
    Category_ids format; CRW's evaluator reads the value, so no palette)."""
    image = Image.fromarray(np.asarray(ids, dtype=np.uint8), mode="L")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def image_size(path, what="image"):
    """(width, height) from an image's header; a missing or unreadable file is an InputError."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: {what} not found (check --data-root and the video list)")
    try:
        with open_image(path) as image:
            return image.size
    except UnreadableImage as e:
        raise InputError(f"{path}: cannot read {what} ({str(e).removeprefix(f'{path}: ')}) (replace the file)") from None


def check_label_header(path, size=None, what="annotation"):
    """Header check of a label PNG: it opens, it is an indexed ('P') or 8-bit single-channel
    ('L') image, and its (width, height) equals `size` when given (the frame's)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: {what} not found (check the folder)")
    try:
        with open_image(path) as image:
            mode, found = image.mode, image.size
    except UnreadableImage as e:
        raise InputError(f"{path}: cannot read {what} ({str(e).removeprefix(f'{path}: ')}) (replace the file)") from None
    if mode not in LABEL_MODES:
        raise InputError(f"{path}: {what} is a {mode!r} image; ids must be stored as an indexed ('P') "
                         f"or single-channel ('L') PNG (save the id map itself, not its colours)")
    if size is not None and found != tuple(size):
        raise InputError(f"{path}: {what} is {found[0]}x{found[1]} but its frame is {size[0]}x{size[1]} "
                         f"(labels must have their frame's size; the official evaluators would "
                         f"stretch or misalign them silently)")
    return found


def read_label_png(path, size=None, what="annotation"):
    """An id map [H, W] uint8 from a palette ('P') or grayscale ('L') PNG: the stored index or
    value, never a colour. size: the (width, height) it must have (its frame's)."""
    check_label_header(path, size, what)
    try:
        with Image.open(path) as image:
            return np.array(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: cannot decode {what} ({e}) (replace the file)") from None


def davis_object_count(path, ids):
    """K, the number of objects of a DAVIS first-frame annotation [H, W], after checking its ids:
    apart from void (255) they must be 0..K or 1..K, every one present, K <= DAVIS_MAX_OBJECTS.
    Grey levels or colour values saved instead of palette indices ({0, 38, 75, 113}) fail."""
    present = [v for v in ids_present(ids) if v != DAVIS_VOID]
    k = max(present, default=0)
    if k == 0:
        raise InputError(f"{path}: first-frame annotation has no object (ids 1..K mark the objects to "
                         f"propagate; check that this is the right file)")
    if k > DAVIS_MAX_OBJECTS or set(present) - {0} != set(range(1, k + 1)):
        shown = ", ".join(map(str, present[:8])) + (", ..." if len(present) > 8 else "")
        raise InputError(f"{path}: first-frame ids {{{shown}}} are not object ids 0..K (void 255 aside); they "
                         f"look like grey levels or colours (save palette indices 0, 1, 2, ...; the official "
                         f"evaluator would silently score ids 1..{k} as {k} objects)")
    return k


def ids_present(ids):
    """Sorted values (ints) of a uint8 id map."""
    return np.flatnonzero(np.bincount(np.asarray(ids, np.uint8).ravel(), minlength=256)).tolist()


def check_ids(path, ids, allowed, what, rule):
    """Every value of the uint8 id map `ids` lies in the set `allowed`, else an InputError naming
    the file, the unexpected values and `rule` (what the values must be)."""
    bad = [v for v in ids_present(ids) if v not in allowed]
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
        raise InputError(f"{path}: {what} holds ids {{{shown}}}; {rule}")


def vip_ids_check(path, ids, what="annotation"):
    """VIP ids must be the 20 classes 0..19: the dataset defines no void value. CRW's eval_vip.py
    silently ignores other ground-truth values (and a first frame's would be propagated as
    extra classes), so they are an error here."""
    silent = ("CRW's eval_vip.py would silently ignore these pixels" if what == "annotation"
              else "CRW's eval_vip.py would silently miscount them")
    check_ids(path, ids, range(VIP_NUM_CLASSES), what,
              f"VIP has {VIP_NUM_CLASSES} classes 0..{VIP_NUM_CLASSES - 1} ({silent}; fix the file)")


def read_joints_mat(path, num_frames=None, what="joint file", num_joints=len(JHMDB_JOINTS)):
    """JHMDB joint_positions.mat -> [T, J, 2] float (x, y) pixel coordinates, 0-based.

    The file holds pos_img [2, J, T] in MATLAB's 1-based pixel coordinates; CRW's loader
    subtracts 1. NaN marks a joint that a prediction file gives as not visible (ground truth
    must be finite: pass what="annotation"). num_frames: the T the file must have; num_joints:
    the J (JHMDB's 15; None for any, as for keypoints of your own video)."""
    try:
        mat = sio.loadmat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found (check the folder)") from None
    except Exception as e:  # noqa: BLE001 -- scipy's parser raises many types (IndexError, ...) on a bad file
        raise InputError(f"{path}: cannot read .mat ({e}) (replace the file)") from None
    if "pos_img" not in mat:
        raise InputError(f"{path}: no 'pos_img' array (a JHMDB joint_positions.mat holds pos_img 2x15xT)")
    pos = np.asarray(mat["pos_img"])
    if pos.ndim == 2:  # a one-frame video loses its last axis in MATLAB
        pos = pos[:, :, None]
    if pos.ndim != 3 or pos.shape[0] != 2 or num_joints not in (None, pos.shape[1]) \
            or not np.issubdtype(pos.dtype, np.number):
        raise InputError(f"{path}: pos_img is {'x'.join(map(str, pos.shape))} {pos.dtype}, expected numbers "
                         f"2x{num_joints or 'J'}xT (x/y, the joints, frames; CRW's eval_pck.py would "
                         f"score the joints it finds)")
    if num_frames is not None and pos.shape[2] != num_frames:
        raise InputError(f"{path}: pos_img has {pos.shape[2]} frames but the video has {num_frames} "
                         f"(joints must be given for every frame; CRW would pair them with the wrong frames)")
    pos = pos.astype(np.float64)
    bad = ~np.isfinite(pos) if what == "annotation" else np.isinf(pos)  # a prediction's NaN: "not visible"
    if bad.any():
        _, joint, frame = np.argwhere(bad)[0]
        name = f" ({JHMDB_JOINTS[joint]})" if pos.shape[1] == len(JHMDB_JOINTS) else ""
        rule = "ground truth must be finite" if what == "annotation" else "NaN marks a hidden joint; inf is no position"
        raise InputError(f"{path}: pos_img holds {'NaN or infinite' if what == 'annotation' else 'infinite'} "
                         f"coordinates, first at frame {frame + 1}, joint {joint}{name} ({rule}; fix the file)")
    return pos.transpose(2, 1, 0) - 1.0


def write_joints_mat(path, xy):
    """xy [T, J, 2] 0-based pixel coordinates (NaN = not visible) -> joint_positions.mat with
    pos_img [2, J, T], 1-based like JHMDB's own files."""
    pos = np.asarray(xy, dtype=np.float64).transpose(2, 1, 0) + 1.0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: sio.savemat(tmp, {"pos_img": pos}, format="5"))


# -----------------------------------------------------------------------------
# Dataset layouts
#   DAVIS  JPEGImages/480p/<seq>/00000.jpg, Annotations/480p/<seq>/00000.png (palette),
#          ImageSets/2017/val.txt
#   VIP    Images/<videosN>/<frame>.jpg, Annotations/Category_ids/<videosN>/<frame>.png,
#          lists/val_videos.txt (VIP_Fine's layout)
#   JHMDB  Rename_Images/<class>/<video>/00001.png,
#          joint_positions/<class>/<video>/joint_positions.mat,
#          splits/<class>_test_split1.txt ("<video>.avi 1|2", 2 = test)
# -----------------------------------------------------------------------------

def sorted_frames(folder, suffixes, what="frames folder"):
    """Files of `folder` with one of `suffixes`, in frame order: natural order, digit runs compared
    as numbers (00000, 00001, ...; frame2 before frame10)."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: {what} not found (check --data-root and the video list)")
    return list_files(folder, suffixes)


def read_video_list(path, dataset):
    """Video names from a list file: one per line, or CropMAE's two-column lists
    (`<frames folder> <annotation folder>` for DAVIS / VIP, `<joint_positions.mat>
    <Rename_Images folder>` for JHMDB). JHMDB names are "<class>/<video>"."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: video list not found (check --list / --data-root)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the video list ({e}) (give a text file, one video a line)") from None
    names = []
    for line in text.splitlines():
        if not line.strip():
            continue
        entry = Path(line.split()[0])
        if dataset == "jhmdb":
            if entry.suffix == ".mat":
                entry = entry.parent
            names.append("/".join(entry.parts[-2:]))
        else:
            names.append(entry.name)
    if not names:
        raise InputError(f"{path}: empty video list (one video name a line)")
    return names


def list_videos(dataset, data_root, list_file=None, subset="val"):
    """The videos a benchmark uses, in order.

    DAVIS: ImageSets/2017/<subset>.txt. VIP: lists/<subset>_videos.txt if present, else every
    folder of Images/. JHMDB: the test videos (label 2) of splits/*_test_split1.txt if
    present, else every video of joint_positions/. A list_file overrides these.
    """
    root = Path(data_root)
    if dataset not in DATASETS:
        raise InputError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found (check --data-root)")
    if list_file is not None:
        return read_video_list(list_file, dataset)
    if dataset == "davis":
        path = root / "ImageSets" / "2017" / f"{subset}.txt"
        if not path.exists():
            raise FileNotFoundError(f"{path}: DAVIS video list not found (check --data-root, or pass --list)")
        return read_video_list(path, dataset)
    if dataset == "vip":
        path = root / "lists" / f"{subset}_videos.txt"
        if path.exists():
            return read_video_list(path, dataset)
        if not (root / "Images").is_dir():
            raise FileNotFoundError(f"{root / 'Images'}: VIP frames folder not found (check --data-root)")
        names = sorted(p.name for p in (root / "Images").iterdir() if p.is_dir())
    else:
        names = jhmdb_test_videos(root)
    if not names:
        raise InputError(f"{root}: no videos found (check --data-root, or pass --list)")
    return names


def jhmdb_test_videos(root):
    """JHMDB's split-1 test videos (label 2 in splits/*_test_split1.txt), else every video of
    joint_positions/."""
    splits = sorted((root / "splits").glob("*_test_split1.txt"))
    if splits:
        names = []
        for split in splits:
            action = split.name[:-len("_test_split1.txt")]
            for line in split.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == "2":
                    names.append(f"{action}/{Path(parts[0]).stem}")
        return names
    joints = root / "joint_positions"
    if not joints.is_dir():
        raise FileNotFoundError(f"{joints}: JHMDB joint_positions folder not found (check --data-root)")
    return sorted(f"{c.name}/{v.name}" for c in joints.iterdir() if c.is_dir()
                  for v in c.iterdir() if (v / "joint_positions.mat").exists())


def davis_video(data_root, name, resolution="480p", require_all=False):
    """(frames, annotations) of a DAVIS sequence: the JPEG paths in order and, for each frame,
    its annotation path (None where the folder has none). The first frame's annotation must
    exist; other annotations, if any, must match the frames one to one (require_all: all
    frames must have one, as scoring needs)."""
    frames = sorted_frames(Path(data_root) / "JPEGImages" / resolution / name, (".jpg", ".jpeg", ".png"))
    if not frames:
        raise FileNotFoundError(f"{Path(data_root) / 'JPEGImages' / resolution / name}: no frames (.jpg/.png)")
    ann_dir = Path(data_root) / "Annotations" / resolution / name
    annotations = [ann_dir / f"{f.stem}.png" for f in frames]
    if not annotations[0].exists():
        raise FileNotFoundError(f"{annotations[0]}: first-frame annotation not found")
    present = {p.stem for p in sorted_frames(ann_dir, (".png",), "annotation folder")}
    extra = sorted(present - {f.stem for f in frames})
    if extra:
        raise InputError(f"{ann_dir / (extra[0] + '.png')}: annotation without a frame "
                         f"({len(present)} annotations, {len(frames)} frames)")
    if require_all or len(present) > 1:
        for frame, ann in zip(frames, annotations):
            if ann.stem not in present:
                raise FileNotFoundError(f"{ann}: annotation missing for frame {frame.name} "
                                        f"({len(present)} annotations, {len(frames)} frames)")
    return frames, [a if a.stem in present else None for a in annotations]


def vip_video(data_root, name):
    """(frames, annotations) of a VIP video; every frame needs its Category_ids PNG (CRW's
    loader pairs the two sorted lists one to one)."""
    frames = sorted_frames(Path(data_root) / "Images" / name, (".jpg", ".jpeg", ".png"))
    if not frames:
        raise FileNotFoundError(f"{Path(data_root) / 'Images' / name}: no frames (.jpg/.png)")
    ann_dir = Path(data_root) / "Annotations" / "Category_ids" / name
    annotations = [ann_dir / f"{f.stem}.png" for f in frames]
    present = {p.stem for p in sorted_frames(ann_dir, (".png",), "annotation folder")}
    for frame, ann in zip(frames, annotations):
        if ann.stem not in present:
            raise FileNotFoundError(f"{ann}: annotation missing for frame {frame.name} "
                                    f"({len(present)} annotations, {len(frames)} frames)")
    if len(present) != len(frames):
        extra = sorted(present - {f.stem for f in frames})[0]
        raise InputError(f"{ann_dir / (extra + '.png')}: annotation without a frame "
                         f"({len(present)} annotations, {len(frames)} frames)")
    return frames, annotations


def jhmdb_video(data_root, name):
    """(frames, joints path, ground-truth joints [T, 15, 2] 0-based) of a JHMDB video
    "<class>/<video>"; pos_img must be 2x15xT with T = the number of frames."""
    frames = sorted_frames(Path(data_root) / "Rename_Images" / name, (".png", ".jpg", ".jpeg"))
    if not frames:
        raise FileNotFoundError(f"{Path(data_root) / 'Rename_Images' / name}: no frames (.png/.jpg)")
    if len(frames) < 2:
        raise InputError(f"{frames[0].parent}: {len(frames)} frame; JHMDB scores the frames after the first, so a "
                         f"video needs at least 2 (remove it from the video list)")
    mat = Path(data_root) / "joint_positions" / name / "joint_positions.mat"
    joints = read_joints_mat(mat, len(frames), what="annotation")
    return frames, mat, joints


def check_segmentation_video(dataset, frames, annotations):
    """Check a DAVIS / VIP video before any work and return (first ids [H, W] uint8, number of
    objects K (DAVIS) or None, frame (width, height)): every frame opens and has the first
    frame's size; every annotation (None = absent) is a 'P' / 'L' PNG of that size that
    decodes; the first annotation's ids are valid (DAVIS: 0..K, davis_object_count; VIP:
    classes 0..19) and so are the others' (DAVIS: 0..K and 255; VIP: 0..19)."""
    if dataset == "davis" and len(frames) < 3:  # the official scorer would average no frame: NaN
        raise InputError(f"{frames[0].parent}: {len(frames)} frame(s); DAVIS scores frames 1..T-2 (not the first "
                         f"and the last), so a video needs at least 3 (remove it from the video list)")
    size = frame_size(frames)
    first = read_label_png(annotations[0], size)
    num_objects = davis_object_count(annotations[0], first) if dataset == "davis" else None
    for annotation in annotations:
        if annotation is None:
            continue
        ids = read_label_png(annotation, size)
        if dataset == "davis":
            davis_ids_check(annotation, ids, num_objects)
        else:
            vip_ids_check(annotation, ids)
    return first, num_objects, size


def frame_size(frames):
    """(width, height) shared by every frame of a video (headers only), else an InputError."""
    size = image_size(frames[0], "frame")
    for frame in frames[1:]:
        if (found := image_size(frame, "frame")) != size:
            raise InputError(f"{frame}: frame is {found[0]}x{found[1]} but {frames[0].name} is "
                             f"{size[0]}x{size[1]} (a video's frames must share one size)")
    return size


def davis_ids_check(path, ids, num_objects, what="annotation"):
    """A DAVIS annotation after the first frame holds only 0..K and 255 (void); a prediction
    only 0..K (the official scorer stops on a higher id, void included)."""
    if what == "annotation":
        allowed, silent = {*range(num_objects + 1), DAVIS_VOID}, "the official evaluator would silently ignore them"
    else:
        allowed, silent = set(range(num_objects + 1)), ("the official evaluator stops on them with exit status 0, "
                                                        "printing 'an index higher than the number of objects'")
    check_ids(path, ids, allowed, what, f"the sequence's first frame has objects 1..{num_objects} ({silent}; fix the file)")


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

def summary_columns(dataset, alphas=(0.1, 0.2)):
    """The paper's columns for a dataset's summary."""
    return {"davis": ["J&F_m", "J_m", "F_m"], "vip": ["mIoU"]}.get(dataset, [f"PCK@{a}" for a in alphas])


def add_dataset_arguments(parser, required=True):
    """The benchmark and its videos, read alike by evaluate.py and propagate.py: --dataset,
    --data-root, --list, --videos, --subset, --resolution (required=False: propagate.py, whose
    --video replaces the first two)."""
    parser.add_argument("--dataset", required=required, choices=DATASETS, help="the benchmark")
    parser.add_argument("--data-root", required=required, type=Path,
                        help="dataset folder in its native layout: DAVIS (JPEGImages/480p, Annotations/480p, "
                             "ImageSets/2017), VIP_Fine (Images, Annotations/Category_ids, lists), JHMDB "
                             "(Rename_Images, joint_positions, splits)")
    parser.add_argument("--list", dest="list_file", type=Path, default=None,
                        help="video list: one name per line, or CropMAE's two-column lists (davis_vallist_480_880.txt, "
                             "vip_vallist.txt, jhmdb_vallist.txt). Default: DAVIS ImageSets/2017/<subset>.txt, VIP "
                             "lists/<subset>_videos.txt (else all), JHMDB splits/*_test_split1.txt test videos (else all)")
    parser.add_argument("--videos", nargs="+", default=None, help="only these videos (JHMDB: <class>/<video>)")
    parser.add_argument("--subset", default="val", help="DAVIS ImageSets/2017/<subset>.txt, VIP lists/<subset>_videos.txt")
    parser.add_argument("--resolution", default="480p", help="DAVIS resolution folder")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_dataset_arguments(parser)
    parser.add_argument("--predictions", required=True, type=Path,
                        help="folder written by propagate.py (DAVIS <seq>/<frame>.png, VIP <video>/<frame>.png, "
                             "JHMDB <class>/<video>/joint_positions.mat)")
    parser.add_argument("--exclude-void", action=argparse.BooleanOptionalAction, default=False,
                        help="DAVIS: leave void (255) pixels out of J and F; the official semi-supervised "
                             "scorer does not (it counts them as background)")
    parser.add_argument("--alphas", type=checked(float, 0, 1, low_open=True), nargs="+", default=[0.1, 0.2],
                        help="JHMDB: PCK thresholds, each in (0, 1] (a fraction of 0.6 x the box diagonal)")
    parser.add_argument("--csv", type=Path, default=None,
                        help="where to write the table (default: <predictions>/<dataset>_scores.csv)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parser


def main(argv=None):
    """Score, print the tables and write the CSV. An expected failure (a bad or missing file, a
    full disk) exits with one line `path: what is wrong (what to do)`, no traceback."""
    args = get_args_parser().parse_args(argv)
    with exit_on_expected_errors():
        check_output_path(args.csv or Path(args.predictions) / f"{args.dataset}_scores.csv", "--csv")
        summary = evaluate_dataset(args.dataset, args.data_root, args.predictions, args.list_file, args.videos,
                                   args.resolution, args.subset, args.exclude_void, args.progress, tuple(args.alphas))
        rows = summary["rows"]
        columns = summary_columns(args.dataset, args.alphas)
        print(format_table(rows))
        print()
        print(format_table([{c: summary[c] for c in columns}]))
        name_key = "sequence" if args.dataset == "davis" else "video"
        summary_row = {name_key: "ALL"}
        if args.dataset == "davis":
            summary_row.update({"J&F": summary["J&F_m"], "J": summary["J_m"], "F": summary["F_m"]})
        else:
            summary_row.update({c: summary[c] for c in columns})
        csv_path = args.csv or Path(args.predictions) / f"{args.dataset}_scores.csv"
        write_csv(csv_path, rows + [summary_row], list(rows[0]) if rows else list(summary_row))
    print(f"\nwrote {csv_path}")
    return summary


if __name__ == "__main__":
    run_command(main)
