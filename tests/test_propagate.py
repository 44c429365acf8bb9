"""Label propagation (propagate.py): the k-NN of A.1.2 / Table 7 and CropMAE's protocol around it.

Expected values are worked out by hand, or given by propagate.label_propagation, the protocol's
wording written literally (itself checked on hand-worked cases below), which the fast path
propagate.label_propagation_fast must reproduce.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate as ev  # noqa: E402
import propagate as pr  # noqa: E402
from cdgmae import CDGMAE, VisionTransformer  # noqa: E402

pytestmark = pytest.mark.float_kernels  # the verdicts compare float results of torch's kernels


# -----------------------------------------------------------------------------
# The propagation rule itself
# -----------------------------------------------------------------------------

# Properties and hand-worked cases that hold for the literal rule and for its fast path.
LITERAL_AND_FAST = pytest.mark.parametrize("propagation", [pr.label_propagation, pr.label_propagation_fast],
                                           ids=["literal", "fast"])


@pytest.mark.parametrize("topk,queue_length,radius", [(4, 3, 2.0), (7, 20, 20), (3, 0, 1.0), (5, 2, 1.5)])
def test_fast_propagation_follows_the_protocol_definition(topk, queue_length, radius):
    g = torch.Generator().manual_seed(topk * 100 + queue_length)
    features = F.normalize(torch.randn(6, 8, 3, 4, generator=g, dtype=torch.float64), dim=1)
    first = torch.softmax(torch.randn(3, 3, 4, generator=g, dtype=torch.float64), dim=0)
    got = pr.label_propagation_fast(features, first, topk=topk, queue_length=queue_length, radius=radius,
                                    temperature=0.7)
    expected = pr.label_propagation(features, first, topk=topk, queue_length=queue_length, radius=radius,
                                    temperature=0.7)
    # float64 (in float32 a near tie at the top-k boundary could pick another neighbour): cosines of D = 8 round
    # apart by <= 2 (D + 2) eps = 2e-15, the softmax and label sums of <= 7 terms in [0, 1] by a few eps
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


@LITERAL_AND_FAST
def test_frame_zero_keeps_the_given_labels(propagation):
    features = F.normalize(torch.randn(3, 8, 3, 4), dim=1)
    first = torch.rand(2, 3, 4)
    got = propagation(features, first, topk=3, queue_length=2, radius=2, temperature=0.7)
    assert torch.equal(got[0], first)


def test_chunking_the_queries_gives_the_same_outputs():
    g = torch.Generator().manual_seed(1)
    features = F.normalize(torch.randn(8, 16, 5, 7, generator=g, dtype=torch.float64), dim=1)
    first = torch.softmax(torch.randn(4, 5, 7, generator=g, dtype=torch.float64), dim=0)
    kwargs = dict(topk=7, queue_length=20, radius=3, temperature=0.7)
    whole = pr.label_propagation_fast(features, first, **kwargs)
    chunked = pr.label_propagation_fast(features, first, max_chunk_bytes=8 * 21 * 35 * 6, **kwargs)  # 6 queries a chunk
    # equal up to the matmul's rounding: float64 (no near tie flips a top-k pick), cosines of D = 16 within
    # 2 (D + 2) eps = 4e-15, then softmax and sums of 7 terms in [0, 1]
    assert torch.allclose(whole, chunked, rtol=0, atol=1e-12)


def test_context_is_frame_zero_then_the_queue_padded_with_frame_zero():
    assert pr.context_frames(3, 5) == [0, 0, 0, 0, 1, 2]
    assert pr.context_frames(7, 3) == [0, 4, 5, 6]
    assert pr.context_frames(4, 0) == [0]


def test_neighbourhood_is_a_strict_euclidean_disc():
    near = pr.neighbourhood_mask(5, 5, radius=2).reshape(5, 5, 5, 5)[2, 2]
    # within distance < 2 of the centre: itself, 4 at distance 1, 4 at sqrt(2); (0, 2) at 2 is out
    assert near.sum() == 9 and not near[0, 2] and near[1, 1]


def moving_square_video(step, frames=5, h=6, w=40, side=2, start=2, beta=0.5):
    """A static background and a textured side x side square moving `step` cells right per frame.

    Every background cell b and square cell c has its own unit vector e; features are
    background (e_b + g)/sqrt(2) and square (e_c + beta g)/sqrt(1 + beta^2) with a shared
    direction g, so square.square' = beta^2 / (1 + beta^2) = 0.2 < square.background =
    beta / sqrt(2 (1 + beta^2)) = 0.316 < background.background' = 0.5 < identical = 1.
    Returns features [T, C, h, w], the first labels [2, h, w] (background, square) and the
    square's true mask per frame [T, h, w]."""
    n_bg, n_sq = h * w, side * side
    C = n_bg + n_sq + 1
    g = torch.zeros(C)
    g[-1] = 1
    eye = torch.eye(C)
    background = ((eye[:n_bg] + g) / math.sqrt(2)).T.reshape(C, h, w)
    square = ((eye[n_bg:n_bg + n_sq] + beta * g) / math.sqrt(1 + beta ** 2)).T.reshape(C, side, side)
    features, masks = [], []
    for t in range(frames):
        f = background.clone()
        x0 = start + step * t
        f[:, 2:2 + side, x0:x0 + side] = square
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[2:2 + side, x0:x0 + side] = True
        features.append(f)
        masks.append(mask)
    masks = torch.stack(masks)
    first = torch.stack([~masks[0], masks[0]]).float()
    return torch.stack(features), first, masks


@LITERAL_AND_FAST
def test_masks_follow_the_motion_when_the_radius_covers_it(propagation):
    features, first, masks = moving_square_video(step=3)
    labels = propagation(features, first, topk=7, queue_length=20, radius=20, temperature=0.7)
    predicted = labels.argmax(1) == 1
    assert ev.region_similarity(masks[1:], predicted[1:]).min() == 1.0
    assert torch.allclose(labels[:, 1][masks], torch.ones(int(masks.sum())), rtol=0, atol=1e-5)  # 7 weights: ~7 eps


@LITERAL_AND_FAST
def test_object_is_lost_predictably_when_the_radius_is_smaller_than_the_motion(propagation):
    # Queue keys at the square's old place are 3 cells away, radius 3 excludes them (strict <):
    # only frame 0's long-term copy of each square cell matches (score 1 / 0.7); the other 6 of
    # the top 7 are background keys (score 0.316 / 0.7, labelled background).
    features, first, masks = moving_square_video(step=3)
    labels = propagation(features, first, topk=7, queue_length=20, radius=3, temperature=0.7)
    s = 0.5 / math.sqrt(2 * 1.25)
    expected = math.exp(1 / 0.7) / (math.exp(1 / 0.7) + 6 * math.exp(s / 0.7))  # 0.307 < 0.5
    object_prob = labels[1:, 1][masks[1:]]
    # a float32 softmax of 7 scores <= 1 / 0.7: a few eps relative, ~1e-7
    assert torch.allclose(object_prob, torch.full_like(object_prob, expected), rtol=0, atol=1e-5)
    assert ev.region_similarity(masks[1:], (labels.argmax(1) == 1)[1:]).max() == 0.0


@LITERAL_AND_FAST
def test_first_frame_memory_is_not_restricted_by_the_radius(propagation):
    # top-1 over frame 0 alone (no queue) with a tiny radius still finds a square 12 cells away
    features, first, masks = moving_square_video(step=6, frames=3)
    labels = propagation(features, first, topk=1, queue_length=0, radius=0.5, temperature=0.7)
    assert torch.equal(labels.argmax(1) == 1, masks)


# -----------------------------------------------------------------------------
# Pre- and post-processing
# -----------------------------------------------------------------------------

def test_input_size_rules():
    assert pr.input_size_for(480, 854, (480, 880)) == (480, 880)  # DAVIS: fixed, stretched
    assert pr.input_size_for(720, 1280, (880,)) == (448, 880)     # VIP: int(720*880/1280)=495 -> 448
    assert pr.input_size_for(1280, 720, (880,)) == (880, 448)     # portrait
    assert pr.input_size_for(500, 500, (880,)) == (880, 832)      # square: width is floored too


def test_nearest_resize_uses_opencv_source_index():
    row = np.arange(7, dtype=np.uint8)[None]
    assert pr.resize_nearest(row, (1, 3)).tolist() == [[0, 2, 4]]             # floor(x * 7 / 3)
    assert pr.resize_nearest(np.array([[5, 9]], np.uint8), (1, 5)).tolist() == [[5, 5, 5, 9, 9]]  # floor(x * 2 / 5)


def opencv_nearest_index(n_in, n_out):
    """OpenCV's resizeNN, written out one output at a time in Python floats (IEEE doubles):
    ifx = 1. / (dsize / ssize); sx = floor(x * ifx); min(sx, ssize - 1)."""
    ifx = 1.0 / (n_out / n_in)
    return [min(math.floor(x * ifx), n_in - 1) for x in range(n_out)]


def test_nearest_resize_follows_opencvs_double_precision_rule_for_every_size_pair():
    rng = np.random.default_rng(0)
    pairs = [(a, b) for a in range(1, 65) for b in range(1, 65)]                      # 4096 small pairs
    pairs += [tuple(int(v) for v in rng.integers(64, 2049, 2)) for _ in range(1000)]  # 1000 large ones
    pairs += [(720, 448), (1024, 880), (480, 880), (854, 880), (576, 448), (1280, 880)]
    mismatches = [(a, b) for a, b in pairs if pr.nearest_source_index(a, b).tolist() != opencv_nearest_index(a, b)]
    assert mismatches == []
    # the float32 rule the function replaced picks another row for 720 -> 448 (CropMAE's VIP frames)
    float32_rule = torch.floor(torch.arange(448, dtype=torch.float32) * torch.tensor(720 / 448, dtype=torch.float32))
    assert float32_rule.long().tolist() != opencv_nearest_index(720, 448)
    ids = rng.integers(0, 20, (37, 23)).astype(np.uint8)
    rows, cols = opencv_nearest_index(37, 52), opencv_nearest_index(23, 11)
    assert pr.resize_nearest(ids, (52, 11)).tolist() == [[int(ids[r, c]) for c in cols] for r in rows]


def test_nearest_resize_equals_cv2_inter_nearest():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    for _ in range(300):
        (h, w), (oh, ow) = rng.integers(1, 1100, 2), rng.integers(1, 1100, 2)
        ids = rng.integers(0, 256, (h, w), dtype=np.uint8)
        expected = cv2.resize(ids, (int(ow), int(oh)), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(pr.resize_nearest(ids, (int(oh), int(ow))), expected), ((h, w), (oh, ow))


def test_frame_resize_is_opencvs_inter_linear_without_antialiasing(tmp_path):
    # the module docstring's claim: bilinear, half-pixel centres, edges clamped, as cv2 INTER_LINEAR on
    # CRW's float32 frames; equal up to float32 rounding (a 720x1280 -> 448x880-like downscale, an upscale)
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    for (h, w), (oh, ow) in [((72, 128), (44, 88)), ((30, 40), (48, 88))]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "frame.png")
        expected = (cv2.resize(pixels.astype(np.float32) / 255, (ow, oh), interpolation=cv2.INTER_LINEAR) - mean) / std
        got = pr.load_frame(tmp_path / "frame.png", (oh, ow)).permute(1, 2, 0).numpy()
        assert np.abs(got - expected).max() < 1e-4  # antialiasing or corner alignment would be ~0.1 off


def test_first_labels_are_bilinear_point_samples_of_the_one_hot_masks():
    # 16x16 input, 8-pixel cells: a cell samples between pixels 3 and 4 (no antialiasing)
    ids = np.zeros((16, 16), np.uint8)
    ids[:, :4] = 3
    values, soft = pr.segmentation_labels(ids, (16, 16), (2, 2))
    assert values.tolist() == [0, 3]
    assert torch.equal(soft[1], torch.tensor([[0.5, 0.0], [0.5, 0.0]]))  # halves of 0 and 1: exact in floats
    assert torch.equal(soft.sum(0), torch.ones(2, 2))


def test_joint_is_a_gaussian_drawn_like_crw():
    maps = pr.joint_heatmaps(np.array([[5.0, 3.0], [5.6, 3.0]]), (8, 10))
    joint = maps[1]  # window x 3..6, y 1..4 (corner int(5 - 1.5) = 3), centre (5, 3)
    assert joint[3, 5] == 1.0
    # exp of an argument computed in float32: relative error about |argument| eps (2e-7 and 1e-6)
    assert math.isclose(joint[3, 4], math.exp(-2), rel_tol=1e-6)
    assert math.isclose(joint[1, 3], math.exp(-16), rel_tol=1e-5)
    assert joint[3, 7] == 0 and joint[0, 5] == 0
    assert maps[2][3, 6] == 1.0  # x = 5.6: corner int(4.1) = 4, so the peak is at x = 6
    assert maps[0][3, 5] == 0 and maps[0][7, 0] == 1  # background: 1 where no joint has mass


def test_joint_decoding_is_the_weighted_mean_of_the_top5_cells():
    soft = torch.zeros(3, 4, 6)
    soft[1, 1, 2] = 1.0
    soft[1, 1, 3] = 3.0
    soft[1, 2, 3] = 0.0001
    xy = pr.decode_joints(soft)
    expected_x = (2 * 1 + 3 * 3 + 3 * 0.0001) / 4.0001
    expected_y = (1 * 1 + 1 * 3 + 2 * 0.0001) / 4.0001
    assert np.allclose(xy[0], [expected_x, expected_y])  # a float64 weighted mean of 3 terms: a few eps
    assert np.isnan(xy[1]).all()  # an all-zero map: not visible


def test_gaussian_of_an_interior_joint_decodes_to_its_cell():
    xy = np.array([[4.0, 3.0], [7.0, 2.0]])
    assert np.allclose(pr.decode_joints(pr.joint_heatmaps(xy, (6, 10))), xy)  # a symmetric mean: a few eps


# -----------------------------------------------------------------------------
# Encoders and features
# -----------------------------------------------------------------------------

def tiny_vit(seed=0, embed_dim=64, num_heads=1, patch_size=8):
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=patch_size, embed_dim=embed_dim, depth=2, num_heads=num_heads)
    with torch.no_grad():  # learned-looking position embeddings (DINO's are learned)
        vit.pos_embed.add_(0.1 * torch.randn_like(vit.pos_embed))
    return vit.eval()


def mae_decoder_keys(dim=32):
    """The decoder entries of an official MAE / CropMAE checkpoint (names as in models_mae.py)."""
    keys = {"mask_token": torch.randn(1, 1, dim), "decoder_pos_embed": torch.randn(1, 17, dim),
            "decoder_embed.weight": torch.randn(dim, 64), "decoder_embed.bias": torch.randn(dim),
            "decoder_norm.weight": torch.randn(dim), "decoder_norm.bias": torch.randn(dim),
            "decoder_pred.weight": torch.randn(8 * 8 * 3, dim), "decoder_pred.bias": torch.randn(8 * 8 * 3)}
    for name, shape in [("norm1.weight", (dim,)), ("attn.qkv.weight", (3 * dim, dim)), ("attn.proj.weight", (dim, dim)),
                        ("mlp.fc1.weight", (4 * dim, dim)), ("mlp.fc2.weight", (dim, 4 * dim))]:
        keys[f"decoder_blocks.0.{name}"] = torch.randn(shape)
    return keys


def checkpoint_in_layout(layout, vit):
    sd = vit.state_dict()
    if layout == "mae":
        return {"model": {**sd, **mae_decoder_keys()}}
    if layout == "cropmae":  # training checkpoints pickle the argparse namespace
        return {"model": {**sd, **mae_decoder_keys()}, "epoch": 99,
                "args": argparse.Namespace(model="vits16", batch_size=2048)}
    if layout == "dino_backbone":
        return dict(sd)
    if layout == "dino_teacher":
        teacher = {f"backbone.{k}": v for k, v in sd.items()}
        teacher.update({"head.mlp.0.weight": torch.randn(16, 64), "head.last_layer.weight_g": torch.randn(8, 1)})
        return {"teacher": teacher, "student": {f"module.backbone.{k}": v for k, v in sd.items()}, "epoch": 100}
    if layout == "ddp":
        return {"model": {f"module.{k}": v for k, v in sd.items()}}
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["mae", "cropmae", "dino_backbone", "dino_teacher", "ddp"])
def test_checkpoint_layouts_give_the_source_models_features(tmp_path, layout):
    vit = tiny_vit()
    path = tmp_path / f"{layout}.pth"
    torch.save(checkpoint_in_layout(layout, vit), path)
    loaded = pr.load_encoder(path)
    frames = torch.randn(2, 3, 40, 56)
    assert torch.equal(pr.extract_features(loaded, frames), pr.extract_features(vit, frames))


def test_cdgmae_checkpoint_gives_the_source_models_features(tmp_path):
    torch.manual_seed(0)
    model = CDGMAE(num_anchors=2, anchor_mask_ratio=0.25, img_size=32, patch_size=8, embed_dim=64, depth=2,
                   num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                   decoder_ffn_dim=64).eval()
    torch.save({"model": model.state_dict(), "args": {"num_heads": 2, "embed_dim": 64, "patch_size": 8}},
               tmp_path / "checkpoint-last.pth")
    loaded = pr.load_encoder(tmp_path / "checkpoint-last.pth")
    assert loaded.num_heads == 2
    frames = torch.randn(2, 3, 40, 56)
    assert torch.equal(pr.extract_features(loaded, frames), pr.extract_features(model, frames))


def test_features_are_unit_vectors_on_the_patch_grid():
    features = pr.extract_features(tiny_vit(), torch.randn(3, 3, 40, 56))
    assert features.shape == (3, 64, 5, 7)
    assert torch.allclose(features.norm(dim=1), torch.ones(3, 5, 7), rtol=0, atol=1e-5)  # D = 64: (D + 2) eps = 4e-6


def test_features_are_the_vits_own_last_block_tokens():
    vit = tiny_vit()
    frames = torch.randn(2, 3, 40, 56)
    tokens = vit(frames)[:, 1:]  # cls dropped
    expected = F.normalize(tokens.reshape(2, 5, 7, -1).permute(0, 3, 1, 2), dim=1)
    assert torch.equal(pr.extract_features(vit, frames), expected)  # the same operations: equal to the bit


# -----------------------------------------------------------------------------
# Whole datasets, through the files the official evaluators read
# -----------------------------------------------------------------------------

H, W, PATCH = 32, 48, 8


def static_frames(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))


def block_mask():
    """Two full-width bands of whole 8-pixel cells: the only edges are rows between cells, where
    upsampling bilinearly and taking the argmax puts the edge back exactly (a corner would be
    rounded off, as the protocol's resize does)."""
    ids = np.zeros((H, W), np.uint8)
    ids[8:16] = 1
    ids[24:32] = 2
    return ids


def make_davis(root, frames=4, name="seq"):
    image = static_frames()
    for t in range(frames):
        (root / "JPEGImages/480p" / name).mkdir(parents=True, exist_ok=True)
        image.save(root / "JPEGImages/480p" / name / f"{t:05d}.jpg", quality=95)
        ev.write_palette_png(root / "Annotations/480p" / name / f"{t:05d}.png", block_mask())
    (root / "ImageSets/2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/2017/val.txt").write_text(name + "\n")


def make_vip(root, frames=3, name="videos7"):
    image = static_frames(1)
    (root / "Images" / name).mkdir(parents=True)
    for t in range(frames):
        image.save(root / "Images" / name / f"{t + 1:012d}.jpg", quality=95)
        ev.write_class_png(root / "Annotations/Category_ids" / name / f"{t + 1:012d}.png", block_mask() * 7)


def jhmdb_joints():
    """15 joints on distinct interior cells of the 8x12 cell grid of a 64x96 frame, as 0-based pixels."""
    cells = [(x, y) for y in (2, 3, 4, 5) for x in (2, 3, 4, 5, 6, 7, 8, 9)][:15]
    return np.array(cells, dtype=np.float64) * PATCH  # 0-based pixels


def make_jhmdb(root, frames=4, name="clap/vid_a"):
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    (root / "Rename_Images" / name).mkdir(parents=True)
    for t in range(frames):
        image.save(root / "Rename_Images" / name / f"{t + 1:05d}.png")
    pos = np.repeat(jhmdb_joints().T[:, :, None], frames, axis=2) + 1  # [2, 15, T], 1-based
    (root / "joint_positions" / name).mkdir(parents=True)
    sio.savemat(root / "joint_positions" / name / "joint_positions.mat", {"pos_img": pos})


def test_static_davis_video_keeps_its_first_mask_through_palette_pngs(tmp_path):
    make_davis(tmp_path / "DAVIS")
    out = tmp_path / "pred"
    pr.propagate_dataset("davis", tmp_path / "DAVIS", tiny_vit(), out, input_size=(H, W))
    png = Image.open(out / "seq" / "00002.png")
    assert png.mode == "P" and png.size == (W, H)
    summary = ev.evaluate_dataset("davis", tmp_path / "DAVIS", out, progress=False)
    assert summary["J&F_m"] == 100.0 and summary["objects"] == 2


def test_static_vip_video_keeps_its_first_parts_through_class_id_pngs(tmp_path):
    make_vip(tmp_path / "VIP")
    out = tmp_path / "pred"
    pr.propagate_dataset("vip", tmp_path / "VIP", tiny_vit(), out, input_size=(W,), size_multiple=16)
    assert Image.open(out / "videos7" / "000000000003.png").mode == "L"
    assert ev.evaluate_dataset("vip", tmp_path / "VIP", out, progress=False)["mIoU"] == 100.0


def test_static_jhmdb_video_keeps_its_first_pose_through_joint_positions_mat(tmp_path):
    make_jhmdb(tmp_path / "JHMDB")
    out = tmp_path / "pred"
    pr.propagate_dataset("jhmdb", tmp_path / "JHMDB", tiny_vit(), out, input_size=(64, 96))
    pos = sio.loadmat(out / "clap/vid_a/joint_positions.mat")["pos_img"]
    # back on their cells up to the float64 decoding's rounding (~1e-14 px); a cell away is 8 px away
    assert pos.shape == (2, 15, 4) and np.allclose(pos[:, :, 3], jhmdb_joints().T + 1)
    summary = ev.evaluate_dataset("jhmdb", tmp_path / "JHMDB", out, progress=False)
    assert summary["PCK@0.1"] == 100.0 and summary["PCK@0.2"] == 100.0


class PatchPixels(torch.nn.Module):
    """A feature extractor that is no ViT: each 8x8 patch's pixels as its feature, L2-normalised."""
    patch_size, embed_dim = PATCH, 3 * PATCH ** 2

    def description(self):
        return {"features": "patch pixels", "stride": self.patch_size}

    def forward(self, frames):  # [B, 3, H, W] -> [B, 3*8*8, H/8, W/8]
        B, _, H, W = frames.shape
        patches = F.unfold(frames, PATCH, stride=PATCH)  # [B, 3*8*8, (H/8)(W/8)]
        return F.normalize(patches, dim=1).reshape(B, -1, H // PATCH, W // PATCH)


def test_any_module_with_the_feature_extractor_interface_propagates(tmp_path):
    # frames in, features out, patch_size and embed_dim: nothing of a ViT is asked of it. A static
    # video's cells match themselves (cosine 1) in every context frame, so the bands stay exact
    make_davis(tmp_path / "DAVIS")
    out = tmp_path / "pred"
    result = pr.propagate_dataset("davis", tmp_path / "DAVIS", PatchPixels(), out, input_size=(H, W), progress=False)
    assert result["written"] == ["seq"]
    assert ev.evaluate_dataset("davis", tmp_path / "DAVIS", out, progress=False)["J&F_m"] == 100.0
    record = json.loads((out / "propagation.json").read_text())
    assert record["encoder"] == {"features": "patch pixels", "stride": PATCH} and record["topk"] == 7  # Table 7


def test_command_line_writes_strips_and_a_rerun_skips_finished_videos(tmp_path, capsys):
    make_davis(tmp_path / "DAVIS")
    torch.save({"model": tiny_vit().state_dict()}, tmp_path / "vit.pth")
    argv = ["--dataset", "davis", "--data-root", str(tmp_path / "DAVIS"), "--checkpoint", str(tmp_path / "vit.pth"),
            "--output", str(tmp_path / "pred"), "--input-size", str(H), str(W), "--visualize"]
    first = pr.main(argv)
    strip = Image.open(tmp_path / "pred/visualize/seq.png")
    assert first["written"] == ["seq"] and strip.height > H
    stamp = (tmp_path / "pred/seq/00001.png").stat().st_mtime_ns
    again = pr.main(argv)
    assert again["written"] == [] and again["skipped"] == ["seq"]
    assert (tmp_path / "pred/seq/00001.png").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="topk: 7 -> 5"):  # the command line: one line, no traceback
        pr.main(argv + ["--topk", "5"])


def test_missing_first_annotation_is_named_before_any_work(tmp_path):
    make_davis(tmp_path / "DAVIS")
    missing = tmp_path / "DAVIS/Annotations/480p/seq/00000.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        pr.propagate_dataset("davis", tmp_path / "DAVIS", tiny_vit(), tmp_path / "pred", input_size=(H, W))
    assert not (tmp_path / "pred").exists()


def test_input_size_not_divisible_by_the_patch_is_named(tmp_path):
    make_davis(tmp_path / "DAVIS")
    with pytest.raises(ValueError, match="00000.jpg.*multiple of the patch size 8"):
        pr.propagate_dataset("davis", tmp_path / "DAVIS", tiny_vit(), tmp_path / "pred", input_size=(30, 48))
