"""A procedural toy world: bags of views for pre-training and toy videos for evaluation.

The paper pre-trains on ImageNet images with S-LDM views (Sec. 3.1) and evaluates by label
propagation on DAVIS-2017, VIP and JHMDB (Sec. 4). None of these can be downloaded here, so
this file draws a small world whose true correspondences are known, and writes it in the
same on-disk layouts:

  * scenes: a textured background and several textured objects -- rigid shapes (ellipses,
    rounded boxes, polygons, stars), articulated objects (a body with jointed limbs) and
    person-like figures with 15 joints and labelled body parts. Textures (stripes, checks,
    dots, rings, noise blobs, zigzags, gradients) live in each part's own coordinates, so
    they move, turn and stretch with it.
  * bags (Sec. 3.1): a "real" scene plus M views in which every object moves, turns, scales
    and changes pose or shape, the camera shifts a little and the lighting changes (global
    gain, tint, contrast and a brightness slope): local change, global consistency, like the
    S-LDM's views. Written in the layout `cdgmae.py` trains on.
  * toy DAVIS / VIP / JHMDB videos: objects move smoothly, occlude each other, and
    distractors with the colours of a target but another texture or shape drift through,
    under a panning camera and flickering light, so that raw colour is not enough to track.

Usage:
    python toyworld.py bags  --output toy/bags --num-bags 2000 --views 4 --size 64 --seed 0
    python toyworld.py davis --output toy/davis --num-videos 10 --frames 20 --height 96 --width 160
    python toyworld.py vip   --output toy/vip
    python toyworld.py jhmdb --output toy/jhmdb
    python toyworld.py all   --output toy          # all four at their defaults

Everything is a pure function of --seed: bag i and video i are drawn from a generator seeded
by (seed, kind, i), so they do not depend on how many others are drawn. Files are written
under a temporary name and renamed; a rerun skips finished bags and videos.

What you may copy: the file needs numpy, Pillow, tqdm, evaluate.py for its dataset conventions
(class lists, the DAVIS palette) and common.py (atomic writes, flags). The textures, shapes and `render_scene`
are plain numpy; `sample_bag` / `perturb_scene` (a scene and its views) and `sample_video` (a
scene per frame) return plain dicts, so another renderer or another on-disk layout can reuse
them.

Units: lengths are pixels of a frame at camera zoom 1 and object scale 1; the same object
and figure sizes are used for bags and videos, so the encoder sees objects of similar pixel
size in training (64x64 bags) and evaluation (96x160 videos).
"""

import argparse
import colorsys
import functools
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common import InputError, atomic_write, check_output_path, checked, exit_on_expected_errors, run_command
from evaluate import JHMDB_JOINTS, VIP_CLASSES, davis_palette  # classes, joints, DAVIS colour map

# -----------------------------------------------------------------------------
# Dataset conventions
# -----------------------------------------------------------------------------

VIP = {name: i for i, name in enumerate(VIP_CLASSES)}  # VIP's 20 classes, in the order of its Category_ids PNGs

# Toy JHMDB action classes (folder names); each has its own joint motion, see figure_motion().
JHMDB_ACTIONS = ["walk", "wave", "jump", "clap"]

TEXTURES = ["stripes", "checks", "dots", "rings", "blobs", "zigzag", "gradient"]
SHAPES = ["ellipse", "superellipse", "polygon", "star"]


# -----------------------------------------------------------------------------
# Textures and shapes, in a part's own coordinates (u, v) in pixels
# -----------------------------------------------------------------------------

def random_color(rng, saturation=(0.35, 0.95), value=(0.3, 0.95), hue=None):
    h = rng.uniform(0, 1) if hue is None else hue % 1.0
    return list(colorsys.hsv_to_rgb(h, rng.uniform(*saturation), rng.uniform(*value)))


def contrasting_pair(rng):
    """Two colours that differ clearly: another hue, or the same hue at another value."""
    first = random_color(rng)
    h, s, v = colorsys.rgb_to_hsv(*first)
    if rng.random() < 0.5:
        second = random_color(rng, hue=h + rng.uniform(0.25, 0.75))
    else:
        second = list(colorsys.hsv_to_rgb(h, s * rng.uniform(0.2, 0.8), 0.15 + (v + 0.45) % 0.8))
    return [first, second]


def sample_texture(rng, colors=None, kinds=TEXTURES, period=(3.5, 8.0)):
    """A texture: two colours and a pattern with its period (pixels), angle and phase."""
    kind = str(rng.choice(kinds))
    angle = rng.uniform(0, math.pi)
    waves = []
    if kind == "blobs":  # a sum of 4 plane waves of random directions, thresholded
        for _ in range(4):
            k = 2 * math.pi / rng.uniform(*period) / 1.5
            a = rng.uniform(0, 2 * math.pi)
            waves.append([k * math.cos(a), k * math.sin(a), rng.uniform(0, 2 * math.pi)])
    return {"kind": kind, "colors": colors if colors is not None else contrasting_pair(rng),
            "period": rng.uniform(*period), "angle": angle, "phase": rng.uniform(0, 1),
            "duty": rng.uniform(0.35, 0.6), "dot": rng.uniform(0.25, 0.4), "waves": waves}


def texture_rgb(texture, u, v):
    """Colours [N, 3] of a texture at part coordinates u, v [N]."""
    c0, c1 = (np.asarray(c, dtype=np.float32) for c in texture["colors"])
    kind, period, phase = texture["kind"], texture["period"], texture["phase"]
    cos, sin = math.cos(texture["angle"]), math.sin(texture["angle"])
    a, b = u * cos + v * sin, v * cos - u * sin
    if kind == "gradient":  # a smooth ramp over about 6 periods
        t = np.clip(a / (6 * period) + 0.5 + (phase - 0.5) * 0.5, 0, 1)[:, None]
        return c0 * (1 - t) + c1 * t
    if kind == "stripes":
        first = (a / period + phase) % 1.0 < texture["duty"]
    elif kind == "checks":
        first = (np.floor(a / period + phase) + np.floor(b / period)) % 2 == 0
    elif kind == "dots":
        du, dv = (a / period + phase) % 1.0 - 0.5, (b / period) % 1.0 - 0.5
        first = du * du + dv * dv < texture["dot"] ** 2
    elif kind == "rings":
        first = (np.sqrt(u * u + v * v) / period + phase) % 1.0 < 0.5
    elif kind == "zigzag":
        first = (a / period + np.abs((b / period) % 1.0 - 0.5) + phase) % 1.0 < 0.5
    elif kind == "blobs":
        noise = sum(np.sin(kx * u + ky * v + p) for kx, ky, p in texture["waves"])
        first = noise > (phase - 0.5)
    else:
        raise ValueError(f"unknown texture kind {kind!r}")
    return np.where(first[:, None], c0, c1)


def shape_contains(shape, u, v):
    """Which part coordinates u, v [N] lie inside the shape ([N] bool)."""
    kind = shape["kind"]
    if kind == "ellipse":
        return (u / shape["rx"]) ** 2 + (v / shape["ry"]) ** 2 <= 1.0
    if kind == "superellipse":
        p = shape["power"]
        return np.abs(u / shape["rx"]) ** p + np.abs(v / shape["ry"]) ** p <= 1.0
    if kind == "capsule":  # the segment (0, 0)-(length, 0) thickened by radius
        du = u - np.clip(u, 0.0, shape["length"])
        return du * du + v * v <= shape["radius"] ** 2
    rho, theta = np.sqrt(u * u + v * v), np.arctan2(v, u) - shape["turn"]
    if kind == "polygon":
        sector = 2 * math.pi / shape["sides"]
        edge = shape["r"] * math.cos(sector / 2) / np.cos(theta % sector - sector / 2)
        return rho <= edge
    if kind == "star":
        return rho <= shape["r"] * (1 + shape["amp"] * np.sin(shape["lobes"] * theta))
    raise ValueError(f"unknown shape kind {kind!r}")


def shape_extent(shape):
    """Radius (pixels) of a disc around the part origin that holds the whole shape."""
    kind = shape["kind"]
    if kind in ("ellipse", "superellipse"):
        return math.hypot(shape["rx"], shape["ry"])
    if kind == "capsule":
        return shape["length"] + shape["radius"]
    if kind == "polygon":
        return shape["r"]
    return shape["r"] * (1 + abs(shape["amp"]))


# -----------------------------------------------------------------------------
# Objects: a pose (pos, angle, scale), a deformation in [-1, 1], joint angles, and parts
# -----------------------------------------------------------------------------

def sample_rigid(rng, radius, texture=None, kinds=SHAPES):
    """A one-part object of about `radius` pixels whose shape squashes or changes its lobes
    with `deform`."""
    kind = str(rng.choice(kinds))
    aspect = rng.uniform(0.65, 1.0)
    shape = {"kind": kind, "rx": radius, "ry": radius * aspect, "power": rng.uniform(2.5, 5.0),
             "sides": int(rng.integers(3, 7)), "r": radius * 1.1, "lobes": int(rng.integers(3, 7)),
             "amp": rng.uniform(0.15, 0.3), "turn": rng.uniform(0, 2 * math.pi)}
    return {"kind": "rigid", "pos": [0.0, 0.0], "angle": rng.uniform(0, 2 * math.pi), "scale": 1.0,
            "deform": rng.uniform(-1, 1), "joints": [], "shape": shape,
            "texture": texture if texture is not None else sample_texture(rng)}


def sample_articulated(rng, radius, texture=None):
    """A body (ellipse or rounded box) with 1-2 limbs of two capsules each; its joints are
    [shoulder, elbow] angles per limb."""
    body = sample_rigid(rng, radius, texture, kinds=["ellipse", "superellipse"])
    limbs = []
    for k in range(int(rng.integers(1, 3))):
        limbs.append({"attach": rng.uniform(0, 2 * math.pi) if k == 0 else None,
                      "lengths": [radius * rng.uniform(0.6, 0.9), radius * rng.uniform(0.5, 0.8)],
                      "radius": radius * rng.uniform(0.22, 0.3),
                      "texture": sample_texture(rng)})
    if len(limbs) == 2:  # the second limb on the opposite side
        limbs[1]["attach"] = limbs[0]["attach"] + math.pi + rng.uniform(-0.5, 0.5)
    body.update(kind="articulated", limbs=limbs,
                joints=[float(a) for a in rng.uniform(-0.8, 0.8, 2 * len(limbs))])
    return body


# A figure's skeleton in units of its height; its joints are the angles of FIGURE_POSE.
FIGURE_POSE = ["lean", "neck", "r_shoulder", "r_elbow", "l_shoulder", "l_elbow",
               "r_hip", "r_knee", "l_hip", "l_knee"]
FIGURE = {"torso": 0.30, "neck": 0.05, "head": 0.075, "shoulder": 0.10, "hip": 0.06,
          "upper_arm": 0.16, "forearm": 0.15, "thigh": 0.21, "shin": 0.20,
          "torso_radius": 0.11, "arm_radius": 0.042, "thigh_radius": 0.058, "shin_radius": 0.048}


def sample_figure(rng, height, clothes=None):
    """A person-like figure `height` pixels tall (head to ankle), standing, with textured
    clothes; its parts carry VIP classes."""
    skin = random_color(rng, saturation=(0.25, 0.6), value=(0.45, 0.95),
                        hue=rng.uniform(0.02, 0.11))
    skin_texture = {"kind": "gradient", "colors": [skin, [c * 0.8 for c in skin]],
                    "period": 6.0, "angle": rng.uniform(0, math.pi), "phase": 0.5,
                    "duty": 0.5, "dot": 0.3, "waves": []}
    hair = random_color(rng, saturation=(0.2, 0.8), value=(0.08, 0.45))
    shoe = random_color(rng, saturation=(0.0, 0.5), value=(0.05, 0.35))
    plain = {"kind": "blobs", "period": 5.0, "angle": 0.0, "phase": 0.5, "duty": 0.5, "dot": 0.3}
    clothes = clothes if clothes is not None else [sample_texture(rng, kinds=["stripes", "checks", "dots", "zigzag", "blobs"]),
                                                   sample_texture(rng, kinds=["checks", "stripes", "blobs", "gradient"])]
    return {"kind": "figure", "pos": [0.0, 0.0], "angle": 0.0, "scale": 1.0, "deform": 0.0,
            "joints": [0.0, 0.0, 0.15, 0.1, 0.15, 0.1, 0.08, 0.0, 0.08, 0.0], "height": height,
            "torso_class": VIP["coat"] if rng.random() < 0.3 else VIP["upper-clothes"],
            "head_class": VIP["hat"] if rng.random() < 0.2 else VIP["hair"],
            "textures": {"skin": skin_texture, "torso": clothes[0], "pants": clothes[1],
                         "hair": dict(plain, colors=[hair, [c * 0.7 for c in hair]],
                                      waves=[[1.1, 0.3, 0.0], [-0.4, 1.0, 1.0], [0.7, -0.8, 2.0], [0.2, 1.2, 3.0]]),
                         "shoe": dict(plain, colors=[shoe, [min(1.0, c + 0.15) for c in shoe]],
                                      waves=[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.7, 0.7, 2.0], [-0.7, 0.7, 3.0]])}}


def _direction(angle):
    """Unit vector of a limb `angle` radians away from straight down (y points down)."""
    return np.array([math.sin(angle), math.cos(angle)])


def figure_skeleton(obj):
    """The 15 JHMDB joints [15, 2] of a figure, in its own coordinates (pixels, origin at
    the pelvis, y down), and the points the parts hang from."""
    h = obj["height"] * (1 + 0.05 * obj["deform"])
    pose = dict(zip(FIGURE_POSE, obj["joints"]))
    up = -_direction(pose["lean"])               # torso direction, pelvis -> neck
    side = np.array([up[1], -up[0]])             # points to the figure's right (image left)
    pelvis = np.zeros(2)
    neck = pelvis + FIGURE["torso"] * h * up
    belly = (pelvis + neck) / 2
    face = neck + (FIGURE["neck"] + FIGURE["head"]) * h * -_direction(pose["lean"] + pose["neck"])
    joints = {"neck": neck, "belly": belly, "face": face}
    for name, sign in (("right", 1.0), ("left", -1.0)):
        s = name[0]
        # Positive shoulder / hip angles swing a limb outwards (away from the body's midline).
        shoulder = neck + sign * FIGURE["shoulder"] * h * side
        a = pose["lean"] - sign * pose[f"{s}_shoulder"]
        elbow = shoulder + FIGURE["upper_arm"] * h * _direction(a)
        wrist = elbow + FIGURE["forearm"] * h * _direction(a - sign * pose[f"{s}_elbow"])
        hip = pelvis + sign * FIGURE["hip"] * h * side
        a = pose["lean"] - sign * pose[f"{s}_hip"]
        knee = hip + FIGURE["thigh"] * h * _direction(a)
        ankle = knee + FIGURE["shin"] * h * _direction(a + sign * pose[f"{s}_knee"])
        joints.update({f"{name} shoulder": shoulder, f"{name} elbow": elbow, f"{name} wrist": wrist,
                       f"{name} hip": hip, f"{name} knee": knee, f"{name} ankle": ankle})
    return np.stack([joints[name] for name in JHMDB_JOINTS]), h


def _capsule_part(start, end, radius, texture, cls):
    delta = np.asarray(end) - np.asarray(start)
    return {"pos": [float(start[0]), float(start[1])], "angle": math.atan2(delta[1], delta[0]),
            "shape": {"kind": "capsule", "length": float(np.hypot(*delta)), "radius": radius},
            "texture": texture, "cls": cls}


def object_parts(obj):
    """The parts of an object in its own coordinates, back to front: dicts with pos, angle,
    shape, texture and cls (the VIP class of a figure's part, 0 for other objects)."""
    if obj["kind"] in ("rigid", "articulated"):
        shape = dict(obj["shape"])
        squash = math.exp(0.2 * obj["deform"])  # area-preserving stretch
        shape.update(rx=shape["rx"] * squash, ry=shape["ry"] / squash,
                     amp=shape["amp"] * (1 + 0.6 * obj["deform"]),
                     turn=shape["turn"] + 0.3 * obj["deform"])
        body = {"pos": [0.0, 0.0], "angle": 0.0, "shape": shape, "texture": obj["texture"], "cls": 0}
        if obj["kind"] == "rigid":
            return [body]
        parts = []
        for k, limb in enumerate(obj["limbs"]):  # limbs hang from the body's rim, drawn behind it
            a = limb["attach"]
            start = np.array([shape["rx"] * math.cos(a), shape["ry"] * math.sin(a)]) * 0.8
            angle = a + obj["joints"][2 * k]
            elbow = start + limb["lengths"][0] * np.array([math.cos(angle), math.sin(angle)])
            angle += obj["joints"][2 * k + 1]
            end = elbow + limb["lengths"][1] * np.array([math.cos(angle), math.sin(angle)])
            parts.append(_capsule_part(start, elbow, limb["radius"], limb["texture"], 0))
            parts.append(_capsule_part(elbow, end, limb["radius"] * 0.85, limb["texture"], 0))
        return parts + [body]
    if obj["kind"] != "figure":
        raise ValueError(f"unknown object kind {obj['kind']!r}")
    joints, h = figure_skeleton(obj)
    j = dict(zip(JHMDB_JOINTS, joints))
    t = obj["textures"]
    pelvis = np.zeros(2)
    parts = []
    for name, side in (("right", 1), ("left", -1)):
        parts.append(_capsule_part(j[f"{name} hip"], j[f"{name} knee"], FIGURE["thigh_radius"] * h, t["pants"], VIP["pants"]))
        parts.append(_capsule_part(j[f"{name} knee"], j[f"{name} ankle"], FIGURE["shin_radius"] * h, t["skin"], VIP[f"{name}-leg"]))
        foot = {"pos": [float(j[f"{name} ankle"][0]), float(j[f"{name} ankle"][1])], "angle": 0.0,
                "shape": {"kind": "ellipse", "rx": 0.07 * h, "ry": 0.04 * h}, "texture": t["shoe"], "cls": VIP[f"{name}-shoe"]}
        parts.append(foot)
    parts.append(_capsule_part(j["neck"], j["face"], 0.035 * h, t["skin"], VIP["torso-skin"]))
    parts.append(_capsule_part(pelvis, j["neck"], FIGURE["torso_radius"] * h, t["torso"], obj["torso_class"]))
    for name in ("right", "left"):
        cls = VIP[f"{name}-arm"]
        parts.append(_capsule_part(j[f"{name} shoulder"], j[f"{name} elbow"], FIGURE["arm_radius"] * h, t["skin"], cls))
        parts.append(_capsule_part(j[f"{name} elbow"], j[f"{name} wrist"], FIGURE["arm_radius"] * 0.9 * h, t["skin"], cls))
    head = FIGURE["head"] * h
    lean = dict(zip(FIGURE_POSE, obj["joints"]))
    tilt = lean["lean"] + lean["neck"]
    parts.append({"pos": [float(j["face"][0]), float(j["face"][1])], "angle": tilt,
                  "shape": {"kind": "ellipse", "rx": head * 0.85, "ry": head}, "texture": t["skin"], "cls": VIP["face"]})
    crown = j["face"] - 0.55 * head * _direction(tilt)
    parts.append({"pos": [float(crown[0]), float(crown[1])], "angle": tilt,
                  "shape": {"kind": "ellipse", "rx": head * 0.9, "ry": head * 0.55}, "texture": t["hair"], "cls": obj["head_class"]})
    return parts


# -----------------------------------------------------------------------------
# Scenes and the renderer
# -----------------------------------------------------------------------------
#
# A scene is a dict: "background" (a texture in world coordinates), "objects" (back to
# front), "camera" {"pos": world point at the image centre, "angle", "zoom"} and "light"
# {"gain" [3], "offset", "contrast", "slope" [2], "noise", "noise_seed"}.
# A world point w appears at pixel  zoom * R(angle) (w - pos) + (W/2, H/2); pixel (i, j)
# (row, column) is the point x = j, y = i.

def _rotation(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def world_to_pixel(camera, points, height, width):
    """Pixel coordinates (x, y) [N, 2] of world points [N, 2]."""
    rot = _rotation(camera["angle"]) * camera["zoom"]
    return (np.asarray(points) - np.asarray(camera["pos"])) @ rot.T + np.array([width / 2, height / 2])


def object_to_world(obj, points):
    """World coordinates [N, 2] of points [N, 2] in an object's own coordinates."""
    rot = _rotation(obj["angle"]) * obj["scale"]
    return np.asarray(points) @ rot.T + np.asarray(obj["pos"])


def figure_joints_pixels(scene, index, height, width):
    """Pixel coordinates [15, 2] (x, y; 0-based) of the JHMDB joints of figure `index`."""
    obj = scene["objects"][index]
    return world_to_pixel(scene["camera"], object_to_world(obj, figure_skeleton(obj)[0]), height, width)


def sample_light(rng, strength=1.0):
    """Global lighting: per-channel gain (brightness x tint), offset, contrast, and a linear
    brightness slope across the image."""
    s = strength
    return {"gain": [float(g) for g in rng.uniform(1 - 0.12 * s, 1 + 0.12 * s) * rng.uniform(1 - 0.08 * s, 1 + 0.08 * s, 3)],
            "offset": float(rng.uniform(-0.06, 0.06) * s), "contrast": float(rng.uniform(1 - 0.2 * s, 1 + 0.2 * s)),
            "slope": [float(x) for x in rng.uniform(-0.25, 0.25, 2) * s], "noise": 0.02,
            "noise_seed": int(rng.integers(2 ** 31))}


@functools.lru_cache(maxsize=8)
def pixel_grid(height, width):
    """Row and column coordinates ys, xs [H, W] float32 (read-only, shared)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


def render_scene(scene, height, width, only=None, lighting=True):
    """Draws a scene.

    only: indices of the objects to draw (None: all); the others are skipped, so the pixels
    of a visible object are the same in the full and the partial render.
    Returns image float32 [H, W, 3] in [0, 1]; ids int16 [H, W] (0 background, k the
    (k-1)-th object of scene["objects"] where it is the front-most); classes uint8 [H, W]
    (the VIP class of the front-most part, 0 elsewhere).
    """
    camera = scene["camera"]
    ys, xs = pixel_grid(height, width)
    # Background: pixel -> world.
    inverse = _rotation(-camera["angle"]) / camera["zoom"]
    px = np.stack([xs.ravel() - width / 2, ys.ravel() - height / 2], 1)
    world = px @ inverse.T + np.asarray(camera["pos"])
    image = texture_rgb(scene["background"], world[:, 0].astype(np.float32),
                        world[:, 1].astype(np.float32)).reshape(height, width, 3).astype(np.float32)
    ids = np.zeros((height, width), np.int16)
    classes = np.zeros((height, width), np.uint8)
    for index, obj in enumerate(scene["objects"]):
        if only is not None and index not in only:
            continue
        for part in object_parts(obj):
            # part coordinates -> pixels: one rotation by the summed angles, one scale, one shift
            angle = camera["angle"] + obj["angle"] + part["angle"]
            zoom = camera["zoom"] * obj["scale"]
            origin = world_to_pixel(camera, object_to_world(obj, [part["pos"]]), height, width)[0]
            reach = shape_extent(part["shape"]) * zoom + 1.5
            x0, x1 = max(0, int(origin[0] - reach)), min(width, int(origin[0] + reach) + 2)
            y0, y1 = max(0, int(origin[1] - reach)), min(height, int(origin[1] + reach) + 2)
            if x0 >= x1 or y0 >= y1:
                continue
            dx, dy = xs[y0:y1, x0:x1].ravel() - origin[0], ys[y0:y1, x0:x1].ravel() - origin[1]
            c, s = math.cos(angle) / zoom, math.sin(angle) / zoom
            u, v = (c * dx + s * dy).astype(np.float32), (c * dy - s * dx).astype(np.float32)
            inside = shape_contains(part["shape"], u, v)
            if not inside.any():
                continue
            window = inside.reshape(y1 - y0, x1 - x0)
            image[y0:y1, x0:x1][window] = texture_rgb(part["texture"], u[inside], v[inside])
            ids[y0:y1, x0:x1][window] = index + 1
            classes[y0:y1, x0:x1][window] = part["cls"]
    if lighting:
        image = apply_light(image, scene["light"])
    return image, ids, classes


def apply_light(image, light):
    """Contrast about mid-grey, per-channel gain with a linear slope across the image, an
    offset, then Gaussian sensor noise (seeded by the scene) and clipping to [0, 1]."""
    height, width = image.shape[:2]
    ys, xs = pixel_grid(height, width)
    shade = 1 + light["slope"][0] * (xs / width - 0.5) + light["slope"][1] * (ys / height - 0.5)
    out = (image - 0.5) * light["contrast"] + 0.5
    out = out * np.asarray(light["gain"], np.float32) * shade[..., None] + light["offset"]
    noise = np.random.default_rng(light["noise_seed"]).normal(0, light["noise"], out.shape)
    return np.clip(out + noise.astype(np.float32), 0, 1)


def to_uint8(image):
    return np.round(image * 255).astype(np.uint8)


def sample_background(rng, hue_from=None):
    """A low-contrast, large-scale background texture; with `hue_from` (a colour) it takes
    that colour's hue, which camouflages objects of that colour."""
    h = rng.uniform(0, 1) if hue_from is None else colorsys.rgb_to_hsv(*hue_from)[0]
    base = random_color(rng, saturation=(0.1, 0.5), value=(0.35, 0.8), hue=h)
    other = [min(1.0, max(0.0, c + d)) for c, d in zip(base, rng.uniform(-0.15, 0.15, 3))]
    return sample_texture(rng, colors=[base, other], kinds=["blobs", "stripes", "checks", "gradient"],
                          period=(10.0, 24.0))


def similar_colors(rng, colors, jitter=0.04):
    """A distractor's colours: the given pair, jittered, in either order."""
    pair = [[float(np.clip(c + rng.uniform(-jitter, jitter), 0, 1)) for c in color] for color in colors]
    return pair[::-1] if rng.random() < 0.3 else pair


def sample_distractor(rng, target, radius):
    """An object with (nearly) the colours of `target` but another texture and shape."""
    source = target["texture"] if target["kind"] != "figure" else target["textures"]["torso"]
    kinds = [k for k in TEXTURES if k not in (source["kind"], "gradient")]
    texture = sample_texture(rng, colors=similar_colors(rng, source["colors"]), kinds=kinds)
    if rng.random() < 0.3:
        return sample_articulated(rng, radius, texture)
    return sample_rigid(rng, radius, texture)


# -----------------------------------------------------------------------------
# Bags of views (Sec. 3.1)
# -----------------------------------------------------------------------------

# Sizes in pixels. cdgmae.py's trainer crops a bag image at scale [0.5, 1] of its area and
# resizes it back, which magnifies it 1 to 1.41 times (about 1.2 on average); videos are not
# cropped, so their objects are drawn VIDEO_ZOOM times larger, to look the same size to the
# encoder in pre-training and in evaluation. Objects span 3-6 patches of 8 pixels, as
# ImageNet objects span several 16-pixel patches of a 224 image.
OBJECT_RADIUS = (11.0, 19.0)   # bag objects
FIGURE_HEIGHT = (50.0, 64.0)   # bag figures, head to ankle
VIDEO_ZOOM = 1.2


def sample_scene(rng, height, width, num_objects=(2, 4), figure_prob=0.35, distractor_prob=0.5):
    """A random static scene: a background, num_objects (a [low, high) range) objects --
    rigid, articulated, sometimes a figure -- and, with `distractor_prob`, one more object
    with the colours of another; the real image of a bag."""
    objects = []
    for _ in range(int(rng.integers(*num_objects))):
        radius, r = rng.uniform(*OBJECT_RADIUS), rng.random()
        if r < figure_prob / 2 and not any(o["kind"] == "figure" for o in objects):
            obj = sample_figure(rng, rng.uniform(*FIGURE_HEIGHT))
            obj["joints"] = [float(a) for a in figure_pose(rng)]
        elif r < 0.45:
            obj = sample_articulated(rng, radius)
        else:
            obj = sample_rigid(rng, radius)
        objects.append(obj)
    if rng.random() < distractor_prob:
        objects.insert(int(rng.integers(0, len(objects) + 1)),
                       sample_distractor(rng, objects[int(rng.integers(len(objects)))], rng.uniform(*OBJECT_RADIUS)))
    margin = 0.15
    for obj in objects:
        obj["pos"] = [float(rng.uniform(margin, 1 - margin) * width), float(rng.uniform(margin, 1 - margin) * height)]
        obj["scale"] = float(rng.uniform(0.85, 1.15))
        if obj["kind"] == "figure":
            obj["angle"] = float(rng.uniform(-0.3, 0.3))
            obj["pos"][1] = float(rng.uniform(0.45, 0.75) * height)
    camouflage = objects[0]["texture"]["colors"][0] if (rng.random() < 0.5 and objects[0]["kind"] != "figure") else None
    return {"background": sample_background(rng, camouflage), "objects": objects,
            "camera": {"pos": [width / 2, height / 2], "angle": 0.0, "zoom": 1.0},
            "light": sample_light(rng, 0.5)}


def figure_pose(rng):
    """A random standing pose: small lean and tilt, arms and legs anywhere in a natural range."""
    return [rng.uniform(-0.15, 0.15), rng.uniform(-0.3, 0.3), rng.uniform(0.0, 2.2), rng.uniform(0.0, 1.8),
            rng.uniform(0.0, 2.2), rng.uniform(0.0, 1.8), rng.uniform(-0.1, 0.6), rng.uniform(0.0, 1.2),
            rng.uniform(-0.1, 0.6), rng.uniform(0.0, 1.2)]


def perturb_scene(rng, scene, move=5.0, turn=0.45, rescale=0.15, pose=0.7, camera_shift=3.0,
                  camera_turn=0.05, camera_zoom=0.06, light=1.5):
    """One generated view of a scene: every object moves (pixels, Gaussian), turns (radians,
    uniform), rescales (log-uniform) and changes pose / shape; the camera shifts, turns and
    zooms a little; the lighting is drawn anew at strength `light`. Identities, textures and
    the depth order stay, as in the S-LDM's views (Sec. 3.1: local change, global
    consistency)."""
    # Fields are replaced, never mutated, so shallow copies keep `scene` intact.
    view = dict(scene, objects=[dict(obj) for obj in scene["objects"]], camera=dict(scene["camera"]))
    for obj in view["objects"]:
        obj["pos"] = [float(p + rng.normal(0, move)) for p in obj["pos"]]
        obj["scale"] = float(obj["scale"] * math.exp(rng.uniform(-rescale, rescale)))
        obj["deform"] = float(np.clip(obj["deform"] + rng.uniform(-0.8, 0.8), -1, 1))
        if obj["kind"] == "figure":
            obj["angle"] = float(np.clip(obj["angle"] + rng.uniform(-0.2, 0.2), -0.4, 0.4))
            low, high = np.array([-0.2, -0.4, 0, 0, 0, 0, -0.2, 0, -0.2, 0]), np.array([0.2, 0.4, 2.6, 2.0, 2.6, 2.0, 0.8, 1.5, 0.8, 1.5])
            obj["joints"] = [float(a) for a in np.clip(np.asarray(obj["joints"]) + rng.uniform(-pose, pose, 10), low, high)]
        else:
            obj["angle"] = float(obj["angle"] + rng.uniform(-turn, turn))
            obj["joints"] = [float(np.clip(a + rng.uniform(-pose, pose), -1.2, 1.2)) for a in obj["joints"]]
    cam = view["camera"]
    cam["pos"] = [float(p + rng.uniform(-camera_shift, camera_shift)) for p in cam["pos"]]
    cam["angle"] = float(cam["angle"] + rng.uniform(-camera_turn, camera_turn))
    cam["zoom"] = float(cam["zoom"] * math.exp(rng.uniform(-camera_zoom, camera_zoom)))
    view["light"] = sample_light(rng, light)
    return view


def sample_bag(seed, index, num_views=4, size=64):
    """The scenes of bag `index`: [real, view_00, ..., view_{M-1}], a function of (seed, index)."""
    rng = np.random.default_rng([seed, 0, index])
    real = sample_scene(rng, size, size)
    return [real] + [perturb_scene(rng, real) for _ in range(num_views)]


def save_image(array_or_image, path, format, **params):
    """Atomic image write: a temporary name that matches no bag / frame pattern, then rename.
    JPEGs are written without chroma subsampling (subsampling=0), which would smear the
    toy world's fine coloured textures."""
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format=format, **params))


def save_bytes(data, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def palette_png(ids):
    """A mode 'P' image of ids [H, W] (0..255) with the DAVIS palette."""
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(davis_palette().ravel().tolist())
    return image


def write_bags(output, num_bags=2000, num_views=4, size=64, seed=0, gt_output=None, quality=95,
               progress=True):
    """Writes bags in cdgmae.py's layout (Sec. 3.1):

        output/scene_000000/real.jpg, view_00.jpg ... view_{M-1}.jpg

    and, with gt_output (a folder outside `output`), the instance ids of every image as
    DAVIS-palette PNGs gt_output/scene_000000/real.png, view_00.png, ... (id k = the k-th
    object of the bag's scene; the same object has the same id in every view).
    Views are written before real.jpg, so a folder with real.jpg is complete; finished bags
    are skipped. Returns the list of bag folder names.
    """
    output = Path(output)
    if gt_output is not None:
        gt = Path(gt_output).resolve()
        if gt == output.resolve() or output.resolve() in gt.parents:
            raise InputError(f"{gt_output}: the ground-truth folder must not be inside the bag folder {output} "
                             f"(give another --gt-output)")
    names = [f"scene_{i:06d}" for i in range(num_bags)]
    for i, name in enumerate(tqdm(names, desc="bags", disable=not progress)):
        folder = output / name
        files = ["real.jpg"] + [f"view_{k:02d}.jpg" for k in range(num_views)]
        done = all((folder / f).exists() for f in files)
        if gt_output is not None:
            done = done and all((Path(gt_output) / name / (f[:-4] + ".png")).exists() for f in files)
        if done:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        if gt_output is not None:
            (Path(gt_output) / name).mkdir(parents=True, exist_ok=True)
        scenes = sample_bag(seed, i, num_views, size)
        # real last: a bag becomes visible to the trainer only when all of its views exist
        for scene, filename in list(zip(scenes, files))[1:] + [(scenes[0], files[0])]:
            image, ids, _ = render_scene(scene, size, size)
            if gt_output is not None:
                save_image(palette_png(ids), Path(gt_output) / name / (filename[:-4] + ".png"), "PNG")
            save_image(to_uint8(image), folder / filename, "JPEG", quality=quality, subsampling=0)
    return names


# -----------------------------------------------------------------------------
# Videos: smooth motion, occlusions, distractors, a panning camera and flickering light
# -----------------------------------------------------------------------------

def bounce_track(start, velocity, frames, low, high):
    """Positions [T, 2] of a point moving at `velocity` pixels/frame, reflected off the box
    [low, high] (per axis)."""
    pos, vel, out = np.array(start, float), np.array(velocity, float), []
    for _ in range(frames):
        out.append(pos.copy())
        pos = pos + vel
        for axis in range(2):
            if pos[axis] < low[axis] or pos[axis] > high[axis]:
                vel[axis] = -vel[axis]
                pos[axis] = np.clip(pos[axis], low[axis], high[axis])
    return np.stack(out)


def smooth_wave(rng, frames, amplitude, period=(10.0, 30.0)):
    """amplitude * sin(2 pi t / period + phase) for t = 0..T-1 [T]."""
    t = np.arange(frames)
    return amplitude * np.sin(2 * math.pi * t / rng.uniform(*period) + rng.uniform(0, 2 * math.pi))


def figure_motion(rng, action, frames):
    """Figure joint angles [T, 10] (FIGURE_POSE order) and a vertical bob [T] for an action."""
    t = np.arange(frames)
    w = 2 * math.pi / rng.uniform(10, 16)
    phase = rng.uniform(0, 2 * math.pi)
    swing = np.sin(w * t + phase)
    pose = np.tile(np.array([0.0, 0.0, 0.15, 0.2, 0.15, 0.2, 0.05, 0.1, 0.05, 0.1]), (frames, 1))
    bob = np.zeros(frames)
    if action == "walk":  # legs and arms swing in opposition
        pose[:, 6], pose[:, 8] = 0.05 + 0.45 * swing, 0.05 - 0.45 * swing
        pose[:, 7], pose[:, 9] = 0.3 + 0.3 * np.maximum(-swing, 0), 0.3 + 0.3 * np.maximum(swing, 0)
        pose[:, 2], pose[:, 4] = 0.15 - 0.4 * swing, 0.15 + 0.4 * swing
        pose[:, 0] = 0.05 * np.sin(2 * w * t)
    elif action == "wave":  # the right arm up, the forearm waving
        pose[:, 2] = 2.3 + 0.15 * swing
        pose[:, 3] = 0.6 + 0.6 * np.sin(2 * w * t + phase)
        pose[:, 1] = 0.15 * swing
    elif action == "jump":  # crouch and extend, arms up and down
        crouch = 0.5 - 0.5 * np.cos(w * t + phase)
        pose[:, 7] = pose[:, 9] = 1.2 * crouch
        pose[:, 6] = pose[:, 8] = 0.1 + 0.2 * crouch
        pose[:, 2] = pose[:, 4] = 0.3 + 1.8 * (1 - crouch)
        bob = -6.0 * np.maximum(0, np.sin(w * t + phase - 1.0))
    elif action == "clap":  # forearms turn inwards until the hands meet, then open again
        pose[:, 2] = pose[:, 4] = 0.5 + 0.2 * swing
        pose[:, 3] = pose[:, 5] = -2.0 - 0.5 * swing
    else:
        raise ValueError(f"unknown action {action!r}")
    return pose, bob


def animate(objects, tracks, frames):
    """Per-frame copies of `objects` with the tracked fields (pos, angle, scale, deform,
    joints: arrays with a leading T axis) set to their value at each frame."""
    out = []
    for t in range(frames):
        frame_objects = []
        for obj, track in zip(objects, tracks):
            o = dict(obj)
            for key, values in track.items():
                value = values[t]
                o[key] = [float(x) for x in value] if np.ndim(value) else float(value)
            frame_objects.append(o)
        out.append(frame_objects)
    return out


def object_track(rng, obj, frames, height, width, speed=(0.6, 1.8), spin=0.08):
    """A smooth track for a non-figure object: bouncing drift, steady turn, breathing scale,
    deformation and joint waves."""
    start = [rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height]
    a = rng.uniform(0, 2 * math.pi)
    velocity = rng.uniform(*speed) * np.array([math.cos(a), math.sin(a)])
    margin = 0.1
    return {"pos": bounce_track(start, velocity, frames, [margin * width, margin * height],
                                [(1 - margin) * width, (1 - margin) * height]),
            "angle": obj["angle"] + rng.uniform(-spin, spin) * np.arange(frames) + smooth_wave(rng, frames, 0.15),
            "scale": obj["scale"] * np.exp(smooth_wave(rng, frames, 0.1)),
            "deform": np.clip(obj["deform"] * 0.5 + smooth_wave(rng, frames, 0.6), -1, 1),
            "joints": np.stack([a + smooth_wave(rng, frames, 0.6, (8, 16)) for a in obj["joints"]], 1)
                      if obj["joints"] else np.zeros((frames, 0))}


def crossing_track(rng, obj, target_positions, frames, speed=(1.2, 2.2)):
    """A straight track that passes over `target_positions` [T, 2] at a random middle frame;
    it may start outside the frame and enter ("appear") later."""
    meet = int(rng.integers(frames // 4, max(frames // 4 + 1, 3 * frames // 4)))
    a = rng.uniform(0, 2 * math.pi)
    velocity = rng.uniform(*speed) * np.array([math.cos(a), math.sin(a)])
    pos = target_positions[meet] + (np.arange(frames) - meet)[:, None] * velocity
    track = object_track(rng, obj, frames, 1, 1)
    track["pos"] = pos
    return track


def sample_camera_track(rng, frames, height, width, pan=0.4):
    """Camera per frame: a slow pan (pixels/frame), a slight turn and zoom drift."""
    direction = rng.uniform(0, 2 * math.pi)
    t = np.arange(frames)
    pos = np.array([width / 2, height / 2]) + pan * rng.uniform(0.3, 1.0) * t[:, None] * np.array([math.cos(direction), math.sin(direction)])
    angle = smooth_wave(rng, frames, 0.03, (20, 40))
    zoom = np.exp(smooth_wave(rng, frames, 0.04, (20, 40)))
    return [{"pos": [float(x) for x in pos[k]], "angle": float(angle[k]), "zoom": float(zoom[k])} for k in range(frames)]


def sample_light_track(rng, frames, strength=1.0):
    """Lighting per frame: a smooth drift between two draws plus small flicker."""
    a, b = sample_light(rng, strength), sample_light(rng, strength)
    out = []
    for k in range(frames):
        w = 0.5 - 0.5 * math.cos(math.pi * k / max(1, frames - 1))
        flicker = 1 + rng.uniform(-0.04, 0.04) * strength
        light = {"gain": [((1 - w) * x + w * y) * flicker for x, y in zip(a["gain"], b["gain"])],
                 "offset": (1 - w) * a["offset"] + w * b["offset"],
                 "contrast": (1 - w) * a["contrast"] + w * b["contrast"],
                 "slope": [(1 - w) * x + w * y for x, y in zip(a["slope"], b["slope"])],
                 "noise": a["noise"], "noise_seed": int(rng.integers(2 ** 31))}
        out.append(light)
    return out


def _visible_fraction(scene, index, height, width):
    _, ids, _ = render_scene(scene, height, width, lighting=False)
    _, alone, _ = render_scene(scene, height, width, only=[index], lighting=False)
    return (ids == index + 1).sum() / max(1, (alone == index + 1).sum())


def sample_video(seed, kind, index, frames, height, width, light=2.5, distractors=(2, 3), spin=0.08,
                 camouflage=1.0):
    """Scenes [T] of toy video `index` of a dataset kind ('davis', 'vip' or 'jhmdb') and the
    indices of its annotated objects (DAVIS targets in id order; VIP / JHMDB figures).

    light: strength of the lighting changes; distractors: (min, max) count; spin: the
    largest steady turn of an object (radians/frame); camouflage: the chance that the
    background takes the hue of an annotated object."""
    code = {"davis": 1, "vip": 2, "jhmdb": 3}[kind]
    for attempt in range(200):  # redraw until every annotated object is mostly visible in frame 0
        rng = np.random.default_rng([seed, code, index, attempt])
        objects, tracks, annotated = [], [], []
        if kind == "davis":
            for _ in range(int(rng.integers(2, 4))):
                radius, r = rng.uniform(*OBJECT_RADIUS) * VIDEO_ZOOM, rng.random()
                obj = sample_articulated(rng, radius) if r < 0.35 else sample_rigid(rng, radius)
                if r > 0.85:
                    obj = sample_figure(rng, rng.uniform(*FIGURE_HEIGHT) * VIDEO_ZOOM)
                objects.append(obj)
        else:
            count = int(rng.integers(2, 4)) if kind == "vip" else 1
            actions = rng.choice(JHMDB_ACTIONS, count)
            for k in range(count):
                objects.append(sample_figure(rng, rng.uniform(*FIGURE_HEIGHT) * VIDEO_ZOOM))
                objects[-1]["action"] = str(actions[k])
        annotated = list(range(len(objects)))
        for obj in objects:
            if obj["kind"] == "figure":
                pose, bob = figure_motion(rng, obj.get("action", str(rng.choice(JHMDB_ACTIONS))), frames)
                speed = rng.uniform(0.3, 1.2) * rng.choice([-1, 1]) if obj.get("action") == "walk" or kind != "jhmdb" else rng.uniform(-0.3, 0.3)
                x0 = rng.uniform(0.25, 0.75) * width
                lo, hi = 0.15 * width, 0.85 * width
                xs = bounce_track([x0, 0], [speed, 0], frames, [lo, -1], [hi, 1])[:, 0]
                # the pelvis sits about 0.05 figure heights below the figure's middle
                y0 = 0.5 * height + obj["height"] * (0.05 if kind == "jhmdb" else rng.uniform(-0.05, 0.2))
                track = {"pos": np.stack([xs, y0 + bob], 1), "joints": pose,
                         "angle": smooth_wave(rng, frames, 0.08), "deform": smooth_wave(rng, frames, 0.3),
                         "scale": np.exp(smooth_wave(rng, frames, 0.05))}
            else:
                track = object_track(rng, obj, frames, height, width, spin=spin)
            tracks.append(track)
        # distractors: the colours of an annotated object, another texture, crossing its path
        for _ in range(int(rng.integers(distractors[0], distractors[1] + 1))):
            target = int(rng.integers(len(annotated)))
            # around thin-limbed figures (VIP, JHMDB) smaller distractors, not to hide them whole
            shrink = 1.0 if kind == "davis" else 0.75
            obj = sample_distractor(rng, objects[target], rng.uniform(*OBJECT_RADIUS) * VIDEO_ZOOM * shrink)
            objects.append(obj)
            tracks.append(crossing_track(rng, obj, tracks[target]["pos"], frames))
        # depth order: distractors anywhere for DAVIS / VIP; JHMDB's figure stays in front
        order = list(rng.permutation(len(objects))) if kind != "jhmdb" else list(range(1, len(objects))) + [0]
        objects, tracks = [objects[k] for k in order], [tracks[k] for k in order]
        annotated = [order.index(k) for k in annotated]
        cameras = sample_camera_track(rng, frames, height, width, pan=0.3 if kind == "jhmdb" else 0.5)
        lights = sample_light_track(rng, frames, light)
        background = sample_background(rng, objects[annotated[0]]["texture"]["colors"][0]
                                       if rng.random() < camouflage and objects[annotated[0]]["kind"] != "figure" else None)
        scenes = [{"background": background, "objects": objs, "camera": cam, "light": lighting}
                  for objs, cam, lighting in zip(animate(objects, tracks, frames), cameras, lights)]
        if kind == "jhmdb":
            _keep_figure_inside(scenes, annotated[0], height, width)
        if all(_visible_fraction(scenes[0], k, height, width) > 0.5 for k in annotated):
            return scenes, annotated
    raise RuntimeError(f"toy {kind} video {index}: no draw with visible objects in frame 0")


def _keep_figure_inside(scenes, index, height, width, margin=2.0):
    """Shifts a figure per frame (smoothly enough: the shift follows the joints) so that all of
    its joints stay at least `margin` pixels inside the frame."""
    for scene in scenes:
        joints = figure_joints_pixels(scene, index, height, width)
        shift = np.zeros(2)
        for axis, size in ((0, width), (1, height)):
            low, high = joints[:, axis].min(), joints[:, axis].max()
            if low < margin:
                shift[axis] = margin - low
            elif high > size - 1 - margin:
                shift[axis] = size - 1 - margin - high
        if shift.any():
            cam = scene["camera"]
            world_shift = _rotation(-cam["angle"]) @ shift / cam["zoom"]
            obj = scene["objects"][index]
            obj["pos"] = [float(p + d) for p, d in zip(obj["pos"], world_shift)]


def annotation_lut(scenes, annotated):
    """Render id (0 background, object j -> j + 1) -> annotation id: the k-th annotated object
    becomes k + 1, every other object (distractors) background."""
    lut = np.zeros(len(scenes[0]["objects"]) + 1, np.uint8)
    for k, index in enumerate(annotated):
        lut[index + 1] = k + 1
    return lut


def _video_frames(scenes, height, width):
    for scene in scenes:
        yield render_scene(scene, height, width)


def write_davis(output, num_videos=10, frames=20, height=96, width=160, seed=0, quality=95, progress=True,
                **difficulty):
    """Toy DAVIS-2017 in its layout:

        output/JPEGImages/480p/<seq>/00000.jpg ...   frames
        output/Annotations/480p/<seq>/00000.png ...  palette PNGs: 0 background, 1..K the
                                                     targets (distractors are background)
        output/ImageSets/2017/val.txt                one sequence name per line

    The folder is called 480p as in DAVIS although the toy frames are small. `difficulty`
    goes to sample_video (light, distractors, spin, camouflage). Returns the sequence names."""
    output = Path(output)
    names = [f"toy{i:03d}" for i in range(num_videos)]
    for i, name in enumerate(tqdm(names, desc="davis", disable=not progress)):
        images, annotations = output / "JPEGImages/480p" / name, output / "Annotations/480p" / name
        if (annotations / f"{frames - 1:05d}.png").exists():
            continue
        images.mkdir(parents=True, exist_ok=True)
        annotations.mkdir(parents=True, exist_ok=True)
        scenes, targets = sample_video(seed, "davis", i, frames, height, width, **difficulty)
        lut = annotation_lut(scenes, targets)
        for t, (image, ids, _) in enumerate(_video_frames(scenes, height, width)):
            save_image(to_uint8(image), images / f"{t:05d}.jpg", "JPEG", quality=quality, subsampling=0)
            save_image(palette_png(lut[ids]), annotations / f"{t:05d}.png", "PNG")
    (output / "ImageSets/2017").mkdir(parents=True, exist_ok=True)
    save_bytes("".join(n + "\n" for n in names).encode(), output / "ImageSets/2017/val.txt")
    return names


def write_vip(output, num_videos=10, frames=20, height=96, width=160, seed=0, quality=95, progress=True,
                **difficulty):
    """Toy VIP (video human parsing) in its layout:

        output/Images/videos<N>/000000000001.jpg ...                 frames (12 digits, from 1)
        output/Annotations/Category_ids/videos<N>/000000000001.png   class ids (mode 'L',
                                                                     VIP_CLASSES, 0 background)
        output/Annotations/Human_ids/videos<N>/000000000001.png      person ids 1..P (mode 'L')
        output/lists/val_videos.txt                                  one video name per line

    Each video has 2-3 figures whose parts carry VIP classes, plus distractors (background).
    `difficulty` goes to sample_video. Returns the video names."""
    output = Path(output)
    names = [f"videos{i + 1}" for i in range(num_videos)]
    for i, name in enumerate(tqdm(names, desc="vip", disable=not progress)):
        images = output / "Images" / name
        categories, humans = output / "Annotations/Category_ids" / name, output / "Annotations/Human_ids" / name
        if (humans / f"{frames:012d}.png").exists():
            continue
        for folder in (images, categories, humans):
            folder.mkdir(parents=True, exist_ok=True)
        scenes, figures = sample_video(seed, "vip", i, frames, height, width, **difficulty)
        lut = annotation_lut(scenes, figures)
        for t, (image, ids, classes) in enumerate(_video_frames(scenes, height, width)):
            stem = f"{t + 1:012d}"
            person = lut[ids]
            save_image(to_uint8(image), images / f"{stem}.jpg", "JPEG", quality=quality, subsampling=0)
            save_image(np.where(person > 0, classes, 0).astype(np.uint8), categories / f"{stem}.png", "PNG")
            save_image(person, humans / f"{stem}.png", "PNG")
    (output / "lists").mkdir(parents=True, exist_ok=True)
    save_bytes("".join(n + "\n" for n in names).encode(), output / "lists/val_videos.txt")
    return names


def mat_bytes(arrays):
    """A MATLAB 5 .mat file of `arrays` as bytes, with a fixed header text instead of scipy's
    creation date, so the same content gives the same bytes."""
    import scipy.io  # only the JHMDB writer needs scipy

    buffer = io.BytesIO()
    scipy.io.savemat(buffer, arrays, format="5", do_compression=False)
    data = bytearray(buffer.getvalue())
    data[:116] = b"MATLAB 5.0 MAT-file, written by toyworld.py".ljust(116)
    return bytes(data)


def write_jhmdb(output, num_videos=10, frames=20, height=96, width=128, seed=0, progress=True, **difficulty):
    """Toy JHMDB in its layout:

        output/Rename_Images/<action>/<vid>/00001.png ...           frames (5 digits, from 1)
        output/joint_positions/<action>/<vid>/joint_positions.mat   pos_img [2, 15, T]: 1-based
            (x, y) pixel coordinates in JHMDB_JOINTS order; pos_world [2, 15, T]: the same,
            centred on the image and divided by scale; scale [1, T]: the figure's height in
            pixels; viewpoint: 'E' (a frontal view)
        output/puppet_mask/<action>/<vid>/puppet_mask.mat           part_mask [H, W, T] uint8,
            1 on the figure
        output/splits/<action>_test_split1.txt                      "<vid>.avi 2" per test video

    One figure per video, always in front and with every joint inside the frame, so every
    joint is visible. `difficulty` goes to sample_video. Returns [(action, vid)]."""
    output = Path(output)
    videos = []
    for i in tqdm(range(num_videos), desc="jhmdb", disable=not progress):
        scenes, (figure,) = sample_video(seed, "jhmdb", i, frames, height, width, **difficulty)
        action = scenes[0]["objects"][figure]["action"]
        vid = f"toy{i:03d}_{action}"
        videos.append((action, vid))
        images = output / "Rename_Images" / action / vid
        joints_dir, mask_dir = output / "joint_positions" / action / vid, output / "puppet_mask" / action / vid
        if (mask_dir / "puppet_mask.mat").exists():
            continue
        for folder in (images, joints_dir, mask_dir):
            folder.mkdir(parents=True, exist_ok=True)
        pos_img, scale, masks = np.zeros((2, 15, frames)), np.zeros((1, frames)), np.zeros((height, width, frames), np.uint8)
        for t, (scene, (image, ids, _)) in enumerate(zip(scenes, _video_frames(scenes, height, width))):
            save_image(to_uint8(image), images / f"{t + 1:05d}.png", "PNG")
            pos_img[:, :, t] = figure_joints_pixels(scene, figure, height, width).T + 1  # 1-based
            obj = scene["objects"][figure]
            scale[0, t] = figure_skeleton(obj)[1] * obj["scale"] * scene["camera"]["zoom"]
            masks[:, :, t] = ids == figure + 1
        pos_world = (pos_img - np.array([(width + 1) / 2, (height + 1) / 2])[:, None, None]) / scale[None]
        save_bytes(mat_bytes({"pos_img": pos_img, "pos_world": pos_world, "scale": scale, "viewpoint": "E"}),
                   joints_dir / "joint_positions.mat")
        save_bytes(mat_bytes({"part_mask": masks}), mask_dir / "puppet_mask.mat")
    (output / "splits").mkdir(parents=True, exist_ok=True)
    for action in JHMDB_ACTIONS:
        lines = "".join(f"{vid}.avi 2\n" for a, vid in videos if a == action)
        save_bytes(lines.encode(), output / "splits" / f"{action}_test_split1.txt")
    return videos


TRAINING_VIDEO_INDEX = 10 ** 6  # training video i is drawn as video 10^6 + i: never an evaluated one


def write_videos(output, num_videos=256, frames=20, height=96, width=160, seed=0, quality=95, progress=True):
    """Unlabelled toy videos for video pre-training (SiamMAE's data, `cdgmae.py --pretext
    frames`), as frame folders: output/video_000000/00000.jpg ... Video i is drawn like toy
    DAVIS, VIP and JHMDB videos in turn (i % 3), from the generator of video 10^6 + i, so
    it is never one of the evaluated videos (whose indices are the first few hundred).
    Finished videos (the last frame exists) are skipped. Returns the folder names."""
    output = Path(output)
    names = [f"video_{i:06d}" for i in range(num_videos)]
    for i, name in enumerate(tqdm(names, desc="videos", disable=not progress)):
        folder = output / name
        if (folder / f"{frames - 1:05d}.jpg").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        scenes, _ = sample_video(seed, ("davis", "vip", "jhmdb")[i % 3], TRAINING_VIDEO_INDEX + i, frames, height, width)
        for t, (image, _, _) in enumerate(_video_frames(scenes, height, width)):
            save_image(to_uint8(image), folder / f"{t:05d}.jpg", "JPEG", quality=quality, subsampling=0)
    return names


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

VIDEO_DEFAULTS = {"davis": (96, 160), "vip": (96, 160), "jhmdb": (96, 128)}
MIN_SIZE = 32  # pixels of a side: objects are 14-28 pixels wide


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, output_help):
        p.add_argument("--output", required=True, help=output_help)
        p.add_argument("--seed", type=checked(int, 0), default=0, help="everything is a function of the seed (default 0)")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")

    def bag_flags(p):
        p.add_argument("--num-bags", type=checked(int, 1), default=2000, help="number of bags (default 2000)")
        p.add_argument("--views", type=checked(int, 1), default=4, help="generated views per bag, M (default 4, as the paper)")
        p.add_argument("--size", type=checked(int, MIN_SIZE), default=64,
                       help=f"bag image side in pixels (default 64; at least {MIN_SIZE}: objects are 14-28 pixels wide)")

    def video_flags(p, kind):
        p.add_argument("--num-videos", type=checked(int, 1), default=10, help="number of videos (default 10)")
        p.add_argument("--frames", type=checked(int, 3), default=20,
                       help="frames per video (default 20; at least 3: DAVIS scores frames 1..T-2)")
        p.add_argument("--light", type=checked(float, 0), default=2.5, help="strength of the lighting changes over a video (default 2.5; 0: none)")
        p.add_argument("--distractors", type=checked(int, 0), nargs=2, default=[2, 3], metavar=("MIN", "MAX"),
                       help="distractors per video: objects with an annotated object's colours (default 2 3)")
        p.add_argument("--spin", type=checked(float, 0), default=0.08, help="largest steady turn of an object, radians/frame (default 0.08)")
        p.add_argument("--camouflage", type=checked(float, 0, 1), default=1.0, help="chance that the background takes an annotated object's hue (default 1)")
        if kind is not None:
            p.add_argument("--height", type=checked(int, MIN_SIZE), default=VIDEO_DEFAULTS[kind][0], help=f"frame height (default {VIDEO_DEFAULTS[kind][0]})")
            p.add_argument("--width", type=checked(int, MIN_SIZE), default=VIDEO_DEFAULTS[kind][1], help=f"frame width (default {VIDEO_DEFAULTS[kind][1]})")

    p = sub.add_parser("bags", help="bags of views in cdgmae.py's layout")
    common(p, "bag root folder")
    bag_flags(p)
    p.add_argument("--gt-output", default=None, help="also write instance-id PNGs of every image here (outside --output)")
    for kind in ("davis", "vip", "jhmdb"):
        p = sub.add_parser(kind, help=f"toy {kind.upper()} videos in its layout")
        common(p, "dataset root folder")
        video_flags(p, kind)
    p = sub.add_parser("all", help="bags and the three video sets under one folder")
    common(p, "root: writes bags/, davis/, vip/, jhmdb/ (and bags_gt/ with --gt)")
    bag_flags(p)
    p.add_argument("--gt", action=argparse.BooleanOptionalAction, default=False,
                   help="also write the bags' instance-id PNGs to bags_gt/ (default: no)")
    video_flags(p, None)
    return parser


def check_args(parser, args):
    """Flags that contradict each other are one argparse line (exit 2); an --output (or
    --gt-output) that is a file, or lies below one, is one line `path: what is wrong (what to do)`."""
    if hasattr(args, "distractors") and args.distractors[0] > args.distractors[1]:
        parser.error(f"argument --distractors: {args.distractors[0]} {args.distractors[1]} is not MIN <= MAX")
    try:
        check_output_path(args.output, "--output", folder=True)
        if getattr(args, "gt_output", None) is not None:
            check_output_path(args.gt_output, "--gt-output", folder=True)
    except InputError as e:
        raise SystemExit(str(e)) from None


def main(argv=None):
    """Write the toy data. An expected failure (a bad flag, an output that cannot be written, a full
    disk) ends with one line; a rerun skips what is finished."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    with exit_on_expected_errors():  # e.g. write_bags: a --gt-output inside --output; a full disk
        write(args)


def write(args):
    """The command's data sets under --output."""
    out = Path(args.output)
    difficulty = {k: getattr(args, k) for k in ("light", "distractors", "spin", "camouflage") if hasattr(args, k)}
    if args.command == "bags":
        write_bags(out, args.num_bags, args.views, args.size, args.seed, args.gt_output, progress=args.progress)
    elif args.command == "davis":
        write_davis(out, args.num_videos, args.frames, args.height, args.width, args.seed, progress=args.progress, **difficulty)
    elif args.command == "vip":
        write_vip(out, args.num_videos, args.frames, args.height, args.width, args.seed, progress=args.progress, **difficulty)
    elif args.command == "jhmdb":
        write_jhmdb(out, args.num_videos, args.frames, args.height, args.width, args.seed, progress=args.progress, **difficulty)
    else:
        write_bags(out / "bags", args.num_bags, args.views, args.size, args.seed, out / "bags_gt" if args.gt else None,
                   progress=args.progress)
        write_davis(out / "davis", args.num_videos, args.frames, *VIDEO_DEFAULTS["davis"], args.seed, progress=args.progress,
                    **difficulty)
        write_vip(out / "vip", args.num_videos, args.frames, *VIDEO_DEFAULTS["vip"], args.seed, progress=args.progress,
                    **difficulty)
        write_jhmdb(out / "jhmdb", args.num_videos, args.frames, *VIDEO_DEFAULTS["jhmdb"], args.seed, progress=args.progress,
                    **difficulty)


if __name__ == "__main__":
    run_command(main)
