"""Keeping runs safe: the plumbing that every script of this project shares.

Nothing here is the method, and a reader of the paper can skip this file. Its one job is
that no run goes silently wrong: a bad flag or input stops it before any work with one
line `path: what is wrong (what to do)`, an output is never half written or mixed with
another setting's, and a killed run resumes. In order:

  1. Errors and flags: `InputError`, `one_line`, `write_failure`, `checked` (argparse
     ranges), `HelpFormatter`, `run_command` (Ctrl-C and SIGTERM as one line) and
     `torchrun_environment` (RANK, WORLD_SIZE, LOCAL_RANK checked).
  2. Reading inputs: files in natural order, the bag layout on disk (`bag_files`,
     `find_bags`), images of every mode (`load_rgb`: one rule for every reader), the check of
     a data folder before a run (`check_bags`).
  3. Writing outputs: `atomic_write` (a temporary name, then a rename), the sweep of what
     killed writers left (`remove_stale_temporaries`), checks of output folders.
  4. Settings records: a file's or a folder's fingerprint, and ONE rule that refuses to
     resume or add to an output made with other settings (`refuse_other_settings`, used by
     training, generation, propagation and the metrics).
  5. Tables and CSV files.

It imports no torch (the standard library, numpy and Pillow), so evaluate.py stays light.
"""
import argparse
import contextlib
import csv
import errno
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image


# -----------------------------------------------------------------------------
# 1. Errors and flags
# -----------------------------------------------------------------------------

class InputError(ValueError):
    """A file, folder or setting that cannot be used. The message reads `path: what is wrong
    (what to do)`; the command lines print it as one line."""


# OSError numbers that are the user's to fix: a full disk or quota, a file-size limit, no permission, a
# read-only disk, a path through a file, a folder where a file should be, a symbolic link that loops.
EXPECTED_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
                      errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG)


def one_line(error):
    """An expected error's message on one line: `path: what is wrong (what to do)`."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # only writes fail so
            return write_failure(error.filename, error)
        return f"{error.filename}: {error.strerror} (check the path, its permissions and the free disk space)"
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return "; ".join(" ".join(line.split()) for line in text.splitlines() if line.strip()) or type(error).__name__


@contextlib.contextmanager
def exit_on_expected_errors():
    """Turn an expected failure inside the block into a one-line exit: an InputError, a missing file,
    or an OSError the user is to fix (EXPECTED_OS_ERRORS: a full disk, no permission, ...); any
    other error stays a traceback, a bug to report."""
    try:
        yield
    except (InputError, FileNotFoundError) as e:
        raise SystemExit(one_line(e)) from None
    except OSError as e:
        if e.errno not in EXPECTED_OS_ERRORS:
            raise
        raise SystemExit(one_line(e)) from None


def first_line(error):
    """The first line of an error's message (at most 300 characters)."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def write_failure(path, error, what="", then="rerun"):
    """The one line for a write of `path` that failed: `path: cannot write <what> (reason) (what to
    do, then <then>)`; None when no OSError lies behind `error` (torch.save's zip writer raises a
    RuntimeError over the OSError of a full disk)."""
    while error is not None and not isinstance(error, OSError):
        error = error.__context__
    if error is None:
        return None
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free space in {Path(path).parent}"
    elif error.errno == errno.EFBIG:
        fix = "raise the file-size limit (ulimit -f) or write to a file system that takes larger files"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {Path(path).parent} writable or write elsewhere"
    else:
        fix = "check the path"
    return f"{path}: cannot write{' ' + what if what else ''} ({error.strerror or error}) ({fix}, then {then})"


def checked(kind, low=None, high=None, *, low_open=False, high_open=False):
    """An argparse `type` that parses with `kind` (int or float) and holds the value to the range
    [low, high] (an end is excluded with low_open / high_open; None means unbounded). NaN and
    infinities are refused. A bad value is one argparse error line naming the flag, e.g.
    "argument --topk: 0 is not >= 1"."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text} is not {'>' if low_open else '>='} {low}")
        if high is not None and (value >= high if high_open else value > high):
            raise argparse.ArgumentTypeError(f"{text} is not {'<' if high_open else '<='} {high}")
        return value
    parse.__name__ = kind.__name__
    return parse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the script's docstring as written and every flag's default."""


def run_command(main, resume="rerun the same command to resume"):
    """Run a script's main() as a command. SIGTERM (what `kill`, job schedulers and torchrun send)
    becomes a KeyboardInterrupt in this process, as SIGINT (Ctrl-C) is, so that `finally` blocks
    and atomic writes remove their temporaries; either ends the command with one line and the exit
    status 128 + the signal's number instead of a traceback. Outputs are renamed into place only
    when complete and long jobs skip what is done, so the command resumes (`resume` says how).
    (Processes forked from this one, e.g. DataLoader workers, keep SIGTERM's default: it ends them.)"""
    owner = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(signum)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        main()
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        print(f"interrupted by {signal.Signals(signum).name}; {resume} (finished files are kept, unfinished ones "
              f"removed)", file=sys.stderr)
        raise SystemExit(128 + signum) from None


TORCHRUN_HINT = "torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; unset them to run one process"


def torchrun_environment(env=None):
    """(rank, world size, local rank) from torchrun's RANK, WORLD_SIZE and LOCAL_RANK in `env`
    (os.environ; unset: 0, 1, 0), checked: integers with 0 <= LOCAL_RANK <= RANK < WORLD_SIZE.
    Otherwise (a leftover export, a hand-made launch) a ValueError names the variable, before
    any work, instead of a traceback deep in the run."""
    env = os.environ if env is None else env
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = env.get(name)
        try:
            values[name] = default if text is None else int(text)
        except ValueError:
            raise ValueError(f"{name}={text}: not an integer ({TORCHRUN_HINT})") from None
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE={world_size}: not a number of processes ({TORCHRUN_HINT})")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank}: not in 0..WORLD_SIZE-1 = 0..{world_size - 1} ({TORCHRUN_HINT})")
    if not 0 <= local_rank <= rank:
        raise ValueError(f"LOCAL_RANK={local_rank}: not in 0..RANK = 0..{rank} ({TORCHRUN_HINT})")
    return rank, world_size, local_rank


# -----------------------------------------------------------------------------
# 2. Reading inputs
# -----------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DIFFUSION_FOLDER_FILES = ("model_index.json", "sldm.json", "unet/config.json")  # a diffusion model's folder


def natural_key(name):
    """Sort key of a file name (or path: its name) in which digit runs compare as numbers, so that
    frame_2 comes before frame_10 (and 00002 before 00010, as plain sorting also gives)."""
    parts = re.split(r"(\d+)", os.path.basename(str(name)))  # text, digits, text, ...
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(parts)]


def list_files(folder, suffixes=IMAGE_SUFFIXES):
    """The files of `folder` (not its subfolders) whose suffix is one of `suffixes`, hidden ones
    left out, in natural order (`natural_key`), as Paths."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.is_file() and not e.name.startswith(".")
                 and e.name.lower().endswith(tuple(suffixes))]
    return [Path(folder) / name for name in sorted(names, key=natural_key)]


def raise_error(error):  # os.walk's onerror: an unreadable folder is an error, never silently skipped
    raise error


def refuse_line_breaks(root, names, item="file"):
    """Raise ValueError (one line) if a name (a path relative to `root`) holds a line break or a tab:
    the lists the scripts write (bad_bags.txt, the problem lists, unreadable-shard*.txt) put one
    name on a line, tab-separated from its reason, and the messages one on a line."""
    odd = [name for name in names if any(c in name for c in "\n\r\t")]
    if odd:
        raise ValueError(f"{root}: {len(odd)} {item} name(s) hold a line break or a tab, e.g. {odd[0]!r} (rename "
                         f"them: the lists and messages of this script put one name on a line)")


# The bag layout (Sec. 3.1), which generate_views.py writes and cdgmae.py trains on:
#
#   BAGS/<relative folder of the real image>/<image stem>/     one folder per real image
#       real.<ext>                  the real image (its original bytes)
#       view_00.jpg ... view_{M-1}  the M generated views
#
# A bag is any folder holding a file named real.*. Files are written under a temporary name
# and renamed, so a name that matches below is always complete.

VIEW_NAME = re.compile(r"^view_(\d+)\.(jpg|jpeg|png|bmp|webp)$", re.IGNORECASE)


def is_real_image(name):
    """True for a bag's real image: real.<an image suffix>."""
    name = os.path.basename(str(name)).lower()
    return name.startswith("real.") and name.endswith(IMAGE_SUFFIXES)


def bag_files(bag_dir):
    """(real image path or None, [view paths ordered by index]) of one bag folder."""
    real, views = None, {}
    for entry in os.scandir(bag_dir):
        if is_real_image(entry.name):
            real = entry.path
        elif (match := VIEW_NAME.match(entry.name)):
            views[int(match.group(1))] = entry.path
    return real, [views[k] for k in sorted(views)]


def top_level_entries(root):
    """(folder names, file names) of the top of a data folder, sorted. A symbolic link to a folder
    counts as a folder (a data set linked in) and is walked; deeper links are not followed
    (os.walk). A link that loops, or that leads back to the root, above it or into it, whose items
    the walk would list twice, is a ValueError naming it."""
    real_root = os.path.realpath(root)
    folders, files = [], []
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_symlink():
                try:
                    target = os.path.realpath(entry.path, strict=True)
                except OSError as e:
                    if e.errno == errno.ELOOP:
                        raise ValueError(f"{entry.path}: a symbolic link that loops (remove it)") from None
                    continue  # a dangling link: neither a folder nor a file
                if os.path.isdir(target) and (Path(target).is_relative_to(real_root)
                                              or Path(real_root).is_relative_to(target)):
                    raise ValueError(f"{entry.path}: a symbolic link to {target}, so the folders of {root} would be "
                                     f"listed twice (remove the link)")
            if entry.is_dir():
                folders.append(entry.name)
            elif entry.is_file():
                files.append(entry.name)
    return folders, files


def folder_items(root, folder, filenames, kind="bags"):
    """The items one folder holds, as paths relative to root: the folder itself if it is a bag
    (kind "bags") or a video (kind "frames": it holds images), its image files (kind "crops")."""
    relative = os.path.relpath(folder, root)
    if kind == "crops":
        return [os.path.normpath(os.path.join(relative, f)) for f in sorted(filenames)
                if f.lower().endswith(IMAGE_SUFFIXES)]
    if kind == "bags":
        return [relative] if any(is_real_image(f) for f in filenames) else []
    return [relative] if any(f.lower().endswith(IMAGE_SUFFIXES) for f in filenames) else []


def walk_items(job):
    """Relative paths of the items (see `folder_items`) under root/top: one process's share of a listing."""
    root, top, kind = job
    items = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
        dirnames.sort()
        items += folder_items(root, dirpath, filenames, kind)
    return items


def parallel_map(function, jobs, processes, chunksize=64, start_method="forkserver"):
    """map() over worker processes (not threads: listing, header reads and decoding hold the GIL),
    in-process for small jobs. The processes come from a fork server, a fresh single-threaded
    process: forked straight from a training process, whose torch and CUDA threads may hold locks
    at the fork, a worker can hang. (`function` and the jobs travel pickled: module-level functions.)"""
    jobs = list(jobs)
    if processes <= 1 or len(jobs) < 2 * chunksize:
        return [function(job) for job in jobs]
    with multiprocessing.get_context(start_method).Pool(processes) as pool:
        return pool.map(function, jobs, chunksize=chunksize)


def find_bags(root, rank=0, world_size=1, processes=1, kind="bags", start_method="forkserver"):
    """Sorted relative paths of the bag folders (those holding real.*) under root; kind "crops":
    of the image files, "frames": of the folders holding images (videos).

    With world_size > 1 this returns rank's share only: the top-level folders are dealt out
    round-robin over the ranks and walked by `processes` processes per rank."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: bag root is not a folder")
    tops, files = top_level_entries(root)
    items = folder_items(root, root, files, kind) if rank == 0 else []
    parts = parallel_map(walk_items, [(str(root), top, kind) for top in tops[rank::world_size]], processes,
                         chunksize=4, start_method=start_method)
    return sorted(items + [item for part in parts for item in part])


# Images of every mode become 8-bit RGB by one rule, wherever an image is read (training
# bags, real images for generation, frames for propagation, images for the metrics):
#   1, L, P, RGB, RGBX, YCbCr, CMYK   Pillow's convert("RGB") (CMYK by Pillow's formula, no ICC profile)
#   LA, PA, RGBA, P with transparency  the same, the alpha dropped (not composited), as CropMAE's
#                                      loader (torchvision's default_loader, convert("RGB")) does
#   I;16 (16-bit grey, any order)     the high byte, value >> 8 (convert("RGB") would clip to white)
#   I (32-bit integers)               values in 0..65535 as 16-bit grey; other values are refused
#   F (32-bit floats)                 values in [0, 1] times 255, rounded; other values are refused
#   any other mode                    refused
# EXIF orientation is ignored: pixels are used as stored, as CropMAE's loader uses them, so
# training stays faithful and a mask drawn on a stored frame stays aligned with it. An image
# declaring more than Image.MAX_IMAGE_PIXELS pixels (a decompression bomb or a corrupt header)
# is refused before it is decoded. docs/training.md, "Images of every mode", says the same.

class UnreadableImage(RuntimeError):
    """An image file that cannot be decoded, or whose mode or values the rule above refuses (the
    message starts with its path)."""


RGB_CONVERTED = ("1", "L", "P", "RGB", "RGBX", "YCbCr", "CMYK", "LA", "PA", "RGBA")
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
IMAGE_MODES = RGB_CONVERTED + SIXTEEN_BIT + ("I", "F")
WHAT_TO_DO = "save it as 8-bit RGB or grey"


def open_image(path, name=None):
    """Image.open(path): the header is parsed, no pixel is decoded. UnreadableImage, naming the
    file (or `name`, for a file object), if Pillow cannot identify it or its header declares
    more than Image.MAX_IMAGE_PIXELS pixels (Pillow only warns up to twice that)."""
    source, path = path, path if name is None else name
    too_large = (f"{path}: the header declares more than Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels "
                 f"(a corrupt header or a decompression bomb; shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS "
                 f"if it is real)")
    try:
        # Pillow's warning would precede the one-line refusal below. (The filter is process-wide:
        # threads calling this at once, as metrics.check_images_decode's do, may leave it set,
        # which only silences this same warning.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError:
        raise UnreadableImage(too_large) from None
    except Exception as e:  # noqa: BLE001 -- re-raised with the file's name
        raise UnreadableImage(f"{path}: cannot decode image ({e})") from e
    if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
        image.close()
        raise UnreadableImage(too_large.replace("more than", f"{image.width}x{image.height} pixels, more than"))
    return image


def to_rgb(image, path="image"):
    """A PIL image of any mode -> a new 8-bit RGB PIL image, by the rule above; UnreadableImage
    "path: ..." for a mode or values the rule refuses, or pixels that do not decode."""
    mode = image.mode
    if mode not in IMAGE_MODES:
        raise UnreadableImage(f"{path}: a {mode} image, which has no conversion to 8-bit RGB ({WHAT_TO_DO})")
    try:
        if mode == "P" and "transparency" in image.info:
            return image.convert("RGBA").convert("RGB")  # the palette's colours; its transparency is dropped
        if mode in RGB_CONVERTED:
            return image.convert("RGB")
        values = np.asarray(image)
    except Exception as e:  # noqa: BLE001 -- the decoder's error, with the file's name
        raise UnreadableImage(f"{path}: cannot decode image ({e})") from e
    if mode in SIXTEEN_BIT or mode == "I" and values.min() >= 0 and values.max() <= 65535:
        grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
    elif mode == "F" and np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1:
        grey = np.rint(values * 255).astype(np.uint8)
    else:
        kind, rule = ("32-bit integer", "0..65535 (16-bit)") if mode == "I" else ("32-bit float", "[0, 1]")
        raise UnreadableImage(f"{path}: a {kind} image (mode {mode}) with values {values.min():g}..{values.max():g}, "
                              f"outside {rule} ({WHAT_TO_DO})")
    return Image.fromarray(grey, mode="L").convert("RGB")


def load_rgb(path):
    """PIL RGB image of a file (`to_rgb`); UnreadableImage if it cannot be decoded or is refused."""
    with open_image(path) as image:
        return to_rgb(image, path)


def check_image(path, level="header", also=None):
    """Refuse, before any work, an image that `load_rgb` would refuse: UnreadableImage naming the
    file. level "header": the header is parsed and the mode checked (a 32-bit image, whose values
    decide, is decoded); "decode": every pixel is decoded and converted (`to_rgb`). also: a
    further rule, (opened image, path) -> None or why the image cannot be used."""
    with open_image(path) as image:
        if also is not None and (problem := also(image, path)):
            raise UnreadableImage(f"{path}: {problem}")
        if image.mode not in IMAGE_MODES or level == "decode" or image.mode in ("I", "F"):
            to_rgb(image, path)


def image_problem(path, level="header", also=None):
    """None if the file is an image `load_rgb` takes (`check_image`), else a short reason."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        check_image(path, level, also)
        return None
    except UnreadableImage as e:
        return str(e).removeprefix(f"{path}: ")
    except Exception as e:  # noqa: BLE001 -- any decoder error is reported with the file's name
        return f"unreadable ({type(e).__name__}: {e})"


# What --decode gpu (torchvision's decoders) decodes as to_rgb does: format -> Pillow modes. nvJPEG's
# CMYK, torchvision's 16-bit PNGs (uint16 pixels) and BMP (not decoded) are refused instead.
GPU_MODES = {"JPEG": ("L", "RGB"), "MPO": ("L", "RGB"),  # MPO: a camera's JPEG with a second picture
             "PNG": ("1", "L", "P", "LA", "RGB", "RGBA"), "WEBP": ("RGB", "RGBA")}


def gpu_decode_problem(image, head):
    """None if --decode gpu decodes this opened image as `to_rgb` does, else why not. head: the
    file's first 26 bytes (a PNG's bit depth is byte 24 of its IHDR chunk)."""
    depth = head[24] if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" else 8
    if image.mode in GPU_MODES.get(image.format, ()) and depth <= 8:
        return None
    kind = f"{depth}-bit " if depth > 8 else ""
    return (f"a {kind}{image.format} image in mode {image.mode}, which --decode gpu does not decode as --decode cpu "
            f"does (convert it to 8-bit RGB JPEG or PNG, or train with --decode cpu)")


def gpu_check(image, path):
    """check_image's further rule for --decode gpu: `gpu_decode_problem` of an opened image file."""
    with open(path, "rb") as f:
        return gpu_decode_problem(image, f.read(26))


# Checking a data folder before a run: every bag (or image, or video) is listed and checked, split
# over processes, so that a bad file stops the run before its first step, naming the file.

VERIFY_LEVELS = ("none", "header", "decode")  # --verify-images, from cheapest to most thorough


def bag_problem(job):
    """(bag, reason or None) for one bag; see check_bags."""
    root, bag, num_views, min_views, level, also = job
    real, views = bag_files(Path(root) / bag)
    if real is None:
        return bag, "no real.* image"
    indices = [int(VIEW_NAME.match(os.path.basename(v)).group(1)) for v in views]
    if indices[:num_views] != list(range(num_views)):
        return bag, f"incomplete: has views {indices}, needs view_00..view_{num_views - 1:02d}"
    if 1 + num_views < min_views:
        return bag, f"{1 + num_views} images, needs at least {min_views}"
    if level != "none":
        for path in [real] + views[:num_views]:
            if (problem := image_problem(path, level, also)):
                return bag, f"{os.path.basename(path)}: {problem}"
    return bag, None


def check_bags(root, bags, num_views, min_views, verify_images="header", processes=1, also=None,
               start_method="forkserver"):
    """Problems of the given bags as {bag: reason}: no real image, views missing among
    view_00..view_{num_views-1}, fewer than `min_views` images in all, or an image that cannot be
    read or that `load_rgb` (or the further rule `also`, see check_image) would refuse
    (verify_images "header": its header and mode; "decode": all of it; "none": no image is opened).
    The bags are split over `processes` worker processes."""
    level = {True: "header", False: "none"}.get(verify_images, verify_images)
    jobs = [(str(root), bag, num_views, min_views, level, also) for bag in bags]
    return {bag: why for bag, why in parallel_map(bag_problem, jobs, processes, start_method=start_method) if why}


def item_problem(job):
    """(item, reason or None) for one image (kind "crops") or video (kind "frames"); see check_items."""
    root, item, kind, level, also, min_frames = job
    path = Path(root) / item
    paths = [path] if kind == "crops" else list_files(path)
    if kind == "frames" and len(paths) < min_frames:
        return item, f"{len(paths)} frames, needs at least {min_frames} (a gap of {min_frames - 1} frames)"
    if level != "none":
        for frame in paths:
            if (problem := image_problem(frame, level, also)):
                return item, problem if kind == "crops" else f"{os.path.basename(frame)}: {problem}"
    return item, None


def check_items(root, items, kind, verify_images="header", processes=1, also=None, start_method="forkserver",
                min_frames=1):
    """check_bags for images (kind "crops": each image opens) and videos (kind "frames": at least
    `min_frames` frames, each opens): {item: reason}."""
    jobs = [(str(root), item, kind, verify_images, also, min_frames) for item in items]
    return {item: why for item, why in parallel_map(item_problem, jobs, processes, start_method=start_method) if why}


def read_bag_index(path, key, level):
    """(bags, num_views) from a cached listing (a run's bag-index.json) if it was made for `key` and
    checked at `level` or more thoroughly; None otherwise."""
    try:
        index = json.loads(Path(path).read_text())
        if index["key"] != key or VERIFY_LEVELS.index(index["verified"]) < VERIFY_LEVELS.index(level):
            return None
        return index["bags"], index["num_views"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -----------------------------------------------------------------------------
# 3. Writing outputs
# -----------------------------------------------------------------------------
#
# A file is written under a hidden temporary name beside it, ".<name>.<host>-<pid>.tmp", and
# renamed into place when complete (a folder of files: ".<name>.<host>-<pid>.partial"). So a
# file under its final name is always whole, two processes never write the same temporary, and
# what a killed writer left can be told from a live writer's and swept on the next run.

TEMPORARY_NAME = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.(?P<kind>tmp|partial)$")
OLD_TEMPORARY_NAME = re.compile(r"^\..+\.tmp(?P<pid>\d+)$")  # ".<name>.tmp<pid>", of earlier versions


def temporary_path(path, kind="tmp"):
    """The hidden temporary name of `path` for this process on this host (kind "partial": a folder)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.{kind}")


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder):
    """Delete the temporary files and partial folders in `folder` whose writer is gone: this
    host's processes that no longer run. Another host's are left alone (their writer may be
    alive). Returns the number removed."""
    removed, host = 0, socket.gethostname()
    for entry in os.scandir(folder) if os.path.isdir(folder) else ():
        match = TEMPORARY_NAME.match(entry.name)
        if match is None and (old := OLD_TEMPORARY_NAME.match(entry.name)) and entry.is_file():
            match = {"host": host, "pid": old["pid"]}
        if match and match["host"] == host and not process_alive(int(match["pid"])):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_write(path, write):
    """Call write(tmp) on a temporary name beside `path` (`temporary_path`), then rename it to
    `path`, so that a file under its final name is always complete and two processes writing
    the same file never clash. An error removes the temporary file and names `path`, not the
    temporary; a killed process leaves it, hidden, for `remove_stale_temporaries`."""
    tmp = temporary_path(path)
    try:
        write(tmp)
    except OSError as e:  # the temporary's error is the file's: it names `path`, not the temporary
        tmp.unlink(missing_ok=True)
        if e.errno is not None and (e.filename is None or str(tmp) in (str(e.filename), str(e.filename2))):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        os.replace(tmp, path)
    except OSError as e:  # e.g. `path` is a folder
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e


def write_or_exit(path, write, what, then="rerun"):
    """atomic_write; a full disk, a file-size limit, a read-only folder (any OS error, also one that
    torch.save's writer turns into a RuntimeError) is a one-line exit, and the previous file stays whole."""
    try:
        atomic_write(path, write)
    except (OSError, RuntimeError) as e:
        message = write_failure(path, e, what, then)
        if message is None:
            raise
        raise SystemExit(message) from None


def write_json(path, value):
    """`value` as indented JSON, written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2) + "\n"))


def truncate_log(path, last_step, then="rerun"):
    """Keep the records of a JSON-lines log whose "step" is at most last_step (those of the checkpoint
    a run resumes from), so that the resumed run appends after them and no step is logged twice. A
    line cut by a kill is dropped."""
    if not Path(path).exists():
        return
    kept = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line + "\n")
    write_or_exit(path, lambda tmp: Path(tmp).write_text("".join(kept)), "the log", then)


def check_output_folder(folder, flag="--output"):
    """Raise ValueError (one line) unless `folder` is a folder this process can write in or create:
    it, or else its nearest existing parent, is a folder (not a file) and writable. (As root every
    folder is writable to os.access; a read-only one then fails at the first write, with one line.)"""
    folder = Path(folder)
    existing = next(p for p in [folder, *folder.parents] if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise ValueError(f"{existing}: not a folder (give another {flag})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{existing}: the folder is not writable (make it writable, or give another {flag})")


def check_output_path(path, flag, folder=False):
    """Raise InputError (one line) if `path` cannot be written as a file (folder=False) or a folder:
    it exists as the other kind, or a path component above it is a file."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise InputError(f"{path}: {'not a folder' if folder else 'a folder'} (give another {flag})")
    existing = next((p for p in path.parents if p.exists() or p.is_symlink()), path)
    if not existing.is_dir():
        raise InputError(f"{existing}: not a folder (give another {flag})")


def check_outside(output, source, flag, source_flag):
    """Raise ValueError (one line) if `output` lies inside the input folder `source` (or is it):
    what a script writes there would be read back as input by its next run, or by the next step."""
    if Path(output).resolve().is_relative_to(Path(source).resolve()):
        raise ValueError(f"{output}: lies inside {source_flag} {source} (give an {flag} outside it)")


def check_new_folder(folder, flag="--output"):
    """Refuse to write into an existing file or non-empty folder (nothing is overwritten)."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder}: output folder exists and is not empty (give a new {flag} folder)")


# -----------------------------------------------------------------------------
# 4. Settings records: fingerprints, and the refusal of other settings
# -----------------------------------------------------------------------------
#
# Each script records, in its output, the settings that decide what it computes (training:
# args.json and every checkpoint; generation: generation.json; propagation: propagation.json;
# the metrics: the CSV's .json) with fingerprints of the weights it read. A later run into the
# same output (a resume, another shard, another node) compares its own settings with the record
# and stops, naming every difference, rather than mixing two settings' results in one place.

def file_sha256(path, chunk_size=1 << 24):
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder, suffixes, chunk_size=1 << 24):
    """sha256 over the relative names and bytes of the files of `folder` (at any depth) with one of
    `suffixes`, hidden files excluded: equal for two copies of a model folder, different as soon
    as one weight differs."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise FileNotFoundError(f"{folder}: no weight or config files (give a model folder)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(chunk_size):
                digest.update(block)
    return digest.hexdigest()


def list_fingerprint(names, item="bag"):
    """'<count> bags, sha1 <12 hex>': recorded with a run, so that a resume on another list is refused."""
    return f"{len(names)} {item}s, sha1 {hashlib.sha1(chr(10).join(names).encode()).hexdigest()[:12]}"


def plain(value):
    """argparse values -> JSON-safe plain Python (tuples become lists, paths strings)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def shown(value):
    """A recorded value as a message shows it: a sha256 by its first 12 digits."""
    if value is None:
        return "not recorded"
    return f"{value[:12]}..." if isinstance(value, str) and len(value) == 64 else str(value)


def differences(recorded, current, keys=None, names=None, ignore=()):
    """['name: old -> new', ...] for the keys (default: every key of either, but those in `ignore`)
    whose values differ. names: key -> how a message calls it (a flag), default the key itself."""
    keys = [k for k in dict.fromkeys([*recorded, *current]) if k not in ignore] if keys is None else keys
    names = names or {}
    return [f"{names.get(k, k)}: {shown(recorded.get(k))} -> {shown(current.get(k))}"
            for k in keys if plain(recorded.get(k)) != plain(current.get(k))]


def read_record(path, what_to_do="give another --output"):
    """The settings recorded in the JSON file `path`, a dict; InputError (one line) if it cannot be read."""
    try:
        recorded = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the settings record ({first_line(e)}) ({what_to_do})") from None
    if not isinstance(recorded, dict):
        raise InputError(f"{path}: not a settings record ({what_to_do})")
    return recorded


def refuse_other_settings(source, recorded, current, keys=None, names=None, ignore=(), made="made",
                          what_to_do="give another --output, or rerun with the recorded settings"):
    """Raise InputError (one line) if `current` differs from the `recorded` settings of `source` (a
    record file, a checkpoint) in one of `keys` (`differences`), naming every difference and the way out."""
    changed = differences(recorded, current, keys, names, ignore)
    if changed:
        raise InputError(f"{source}: {made} with other settings: {'; '.join(changed)} ({what_to_do})")


def claim_record(path, settings, keys=None, names=None, ignore=(), made="made",
                 what_to_do="give another --output, or rerun with the recorded settings"):
    """Write the settings record `path` if there is none, or check the one there. The record
    appears complete and only once (written to a temporary name, then hard-linked, which fails if
    the name exists), and every process compares after writing: of two processes that start on a
    fresh output with different settings, the second one stops."""
    tmp = temporary_path(path)
    try:
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process's record: compared below
    except OSError as e:  # a full disk, a file-size limit: the record's error, not its temporary's
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    refuse_other_settings(path, read_record(path, what_to_do), settings, keys, names, ignore, made, what_to_do)


# -----------------------------------------------------------------------------
# 5. Tables and CSV files
# -----------------------------------------------------------------------------

def format_table(rows, columns=None, digits=2):
    """Rows (dicts) as aligned text columns, floats with `digits` decimals."""
    columns = columns or list(rows[0])
    cells = [[f"{r[c]:.{digits}f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_csv(path, rows, columns=None, exclusive=False):
    """Rows (dicts) as a CSV file, written atomically (columns: default the first row's keys).
    exclusive: never replace an existing file, even one another run wrote meanwhile
    (FileExistsError: the temporary file is hard-linked, which fails if the name exists)."""
    columns = columns or list(rows[0])

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    if not exclusive:
        atomic_write(path, write)
        return
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
