"""Faults around the scripts: the file system, numeric flags, interrupts and the environment, one
test per class of fault, checked as the other fault tests check theirs. An expected failure ends
with a non-zero exit status and ONE line `path: what is wrong (what to do)`, no traceback, before
any work where it can be found before; nothing half-written is left under a final name; and the
same command, run again, finishes with what an uninterrupted run writes."""
import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)

import common  # noqa: E402
import cdgmae  # noqa: E402
import demo  # noqa: E402
import evaluate as ev  # noqa: E402
import generate_views as gv  # noqa: E402
import metrics  # noqa: E402
import propagate as pr  # noqa: E402
import toyworld as tw  # noqa: E402
from test_evaluation_faults import H, W, make_davis, tiny_checkpoint  # noqa: E402
from test_generate_views import tiny_sldm_folder, tree_bytes, write_images  # noqa: E402
from test_training_faults import TINY, write_bags  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# Root writes into read-only folders by its capabilities to override file permissions; without them
# (setpriv drops them from the bounding set) a process of root meets a read-only folder as any user does.
WITHOUT_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


# -----------------------------------------------------------------------------
# Inputs of every script, the command lines, and how a failure is read
# -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every script's inputs: bags, images, an S-LDM, a ViT checkpoint and a DAVIS-layout dataset."""
    base = tmp_path_factory.mktemp("world")
    write_bags(base / "bags")
    write_images(base / "images")
    tiny_sldm_folder(base)
    tiny_checkpoint(base / "vit.pth")
    make_davis(base / "DAVIS")
    return base


def train_argv(world, out, *extra):
    return ["--data", world / "bags", "--output", out, "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0",
            *TINY, *extra]


def generate_argv(world, out, images=None):
    return ["--images", images or world / "images", "--model", world / "model", "--output", out, "--views", "2",
            "--steps", "1", "--batch-size", "1", "--workers", "0", "--device", "cpu", "--no-progress"]


def knn_argv(world, out, images=None):
    return ["knn", "--images", images or world / "images", "--checkpoint", world / "vit.pth", "--output", out, "--k", "1",
            "--input-size", "32", "--workers", "0", "--device", "cpu", "--no-progress"]


def metrics_argv(world, csv, bags=None):
    return ["--checkpoint", world / "vit.pth", "--images", world / "images", "--bags", bags or world / "bags",
            "--video", world / "DAVIS", "--frame-gap", "1", "--knn", "1", "--num-pairs", "2", "--input-size", "32",
            "--workers", "0", "--device", "cpu", "--no-overlap", "--csv", csv]


def propagate_argv(world, out, *extra, data=None):
    return ["--dataset", "davis", "--data-root", data or world / "DAVIS", "--checkpoint", world / "vit.pth",
            "--output", out, "--input-size", str(H), str(W), "--device", "cpu", *extra]


def own_video_argv(world, out):
    return ["--video", world / "DAVIS/JPEGImages/480p/seq", "--first-mask", world / "DAVIS/Annotations/480p/seq/00000.png",
            "--checkpoint", world / "vit.pth", "--output", out, "--input-size", str(H), str(W), "--device", "cpu"]


def evaluate_argv(world, csv):
    return ["--dataset", "davis", "--data-root", world / "DAVIS", "--predictions", world / "DAVIS/Annotations/480p",
            "--csv", csv, "--no-progress"]


def toyworld_argv(out):
    return ["bags", "--output", out, "--num-bags", "2", "--views", "1", "--no-progress"]


def cli(main, argv, capsys):
    """(exit status, the error line) of main(argv) as the shell sees them: SystemExit("message")
    prints the message and exits 1; argparse prints its usage and one error line, and exits 2."""
    try:
        main([str(a) for a in argv])
        status, message = 0, ""
    except SystemExit as e:
        status, message = (1, e.code) if isinstance(e.code, str) else (e.code, "")
    err = capsys.readouterr().err
    if status and not message:
        message = err.strip().splitlines()[-1] if err.strip() else ""
    assert "Traceback" not in err and "\n" not in message, err + message
    return status, message


def leftovers(folder):
    """Files a killed or failed writer may leave: hidden temporaries and partial folders."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(".*") if p.name.endswith((".tmp", ".partial")))


def run_mains(cases, prefix=()):
    """main(argv) of each case, in order, in ONE child process (one start-up for many commands):
    [(exit status, error line, files under the case's folder afterwards)]. A case is (module, argv,
    file-size limit in bytes or None, folder). The limit is RLIMIT_FSIZE, the one `ulimit -f` sets,
    for that case only; Python ignores SIGXFSZ, so a write past it fails with EFBIG ("File too
    large") as a write to a full disk fails with ENOSPC. prefix: a command that runs the child."""
    spec = json.dumps([[module, [str(a) for a in argv], limit, str(folder)] for module, argv, limit, folder in cases])
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(TESTS)!r}]; "
            f"import test_system_faults as t; t.child(sys.argv[1])")
    done = subprocess.run([*prefix, sys.executable, "-c", code, spec], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])


def child(spec):
    """The child process of run_mains."""
    import resource
    torch.set_num_threads(1)
    results = []
    for module, argv, limit, folder in json.loads(spec):
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard if limit is None else limit, hard))
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                importlib.import_module(module).main(argv)
            status, message = 0, ""
        except SystemExit as e:
            status, message = (1, e.code) if isinstance(e.code, str) else (e.code, "")
            if status and not message and err.getvalue().strip():
                message = err.getvalue().strip().splitlines()[-1]
        except BaseException:  # noqa: BLE001 -- reported to the test, which fails on it
            status, message = "traceback", traceback.format_exc()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")) if Path(folder).exists() else None
        results.append([status, message, files])
    print("RESULTS " + json.dumps(results))


def assert_one_line(status, message, *names):
    assert status not in (0, "traceback") and message and "\n" not in message, message
    for name in names:
        assert str(name) in message, (name, message)


# -----------------------------------------------------------------------------
# The file system
# -----------------------------------------------------------------------------

def test_a_full_disk_mid_run_is_one_line_and_the_rerun_writes_what_a_clean_run_writes(world, tmp_path):
    """Each script stops at a write that the file-size limit refuses (EFBIG, as a full disk's
    ENOSPC), in the middle of its work where its outputs allow: the third real image (a 5.9 kB PNG)
    of a generation whose first two (1.8 kB JPEGs) fit, the propagation strip (160 kB) after the
    predictions (0.9 kB each), the first checkpoint (13 kB) of a training run after its records.
    Nothing but whole files stays, and the same command, without the limit, ends with the files of
    an uninterrupted run."""
    size = {rel: (world / "images" / rel).stat().st_size for rel in ("n01/a.JPEG", "n01/b.jpg", "n02/sub/c.png")}
    first_two, third = max(size["n01/a.JPEG"], size["n01/b.jpg"]), size["n02/sub/c.png"]
    assert first_two < third  # the views (16x16 JPEGs) and the record are smaller still
    work = {  # name: (module, argv of the output, limit in bytes, the file the message names, rerun's extra argv)
        "train": ("cdgmae", lambda out: train_argv(world, out), 8 << 10, "checkpoint-0000.pth", ["--resume", "auto"]),
        "generate": ("generate_views", lambda out: generate_argv(world, out), (first_two + third) // 2,
                     "n02/sub/c/real.png", []),
        "knn": ("generate_views", lambda out: knn_argv(world, out), 0, gv.RECORD_NAME, []),
        "metrics": ("metrics", lambda out: metrics_argv(world, out / "table.csv"), 0, "table.csv", []),
        "propagate": ("propagate", lambda out: propagate_argv(world, out, "--visualize"), 4 << 10,
                      "visualize/seq.png", []),
        "evaluate": ("evaluate", lambda out: evaluate_argv(world, out / "scores.csv"), 0, "scores.csv", []),
        "toyworld": ("toyworld", toyworld_argv, 0, "scene_000000", []),
    }
    cases = []
    for name, (module, argv, limit, _, again) in work.items():
        (tmp_path / name / "limited").mkdir(parents=True)  # the metrics and evaluate CSVs go in there
        (tmp_path / name / "clean").mkdir(parents=True)
        cases += [(module, argv(tmp_path / name / "limited"), limit, tmp_path / name / "limited"),
                  (module, argv(tmp_path / name / "limited") + again, None, tmp_path / name / "limited"),
                  (module, argv(tmp_path / name / "clean"), None, tmp_path / name / "clean")]
    results = run_mains(cases)
    for i, (name, (_, _, _, named, _)) in enumerate(work.items()):
        (status, message, files), rerun, clean = results[3 * i:3 * i + 3]
        assert_one_line(status, message, tmp_path / name / "limited" / named, "(")
        assert "File too large" in message or "file too large" in message, message
        assert not [f for f in files if f.rsplit("/", 1)[-1].startswith(".") and f.endswith((".tmp", ".partial"))]
        assert rerun[0] == 0 and clean[0] == 0, (name, rerun, clean)
        limited, reference = tmp_path / name / "limited", tmp_path / name / "clean"
        if name == "train":  # the records name their folder; the weights must be those of a clean run
            ours = torch.load(limited / "checkpoint-last.pth", weights_only=True)["model"]
            theirs = torch.load(reference / "checkpoint-last.pth", weights_only=True)["model"]
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        else:
            assert tree_bytes(limited) == tree_bytes(reference), name


def test_a_read_only_output_folder_is_one_line_before_any_work(world, tmp_path):
    """Every script, given an output folder it may not write in, stops with one line naming it and
    writes nothing. (Run by root, the commands run without root's right to override permissions.)"""
    prefix = WITHOUT_OVERRIDE if os.geteuid() == 0 else []
    if prefix and shutil.which(prefix[0]) is None:
        pytest.skip("run as root without setpriv (util-linux), which could drop root's right to write anywhere")
    folder = tmp_path / "read-only"
    folder.mkdir()
    cases = [("cdgmae", train_argv(world, folder)), ("cdgmae", train_argv(world, folder / "new")),
             ("generate_views", generate_argv(world, folder)), ("generate_views", knn_argv(world, folder)),
             ("metrics", metrics_argv(world, folder / "table.csv")), ("propagate", propagate_argv(world, folder)),
             ("propagate", own_video_argv(world, folder)), ("evaluate", evaluate_argv(world, folder / "s.csv")),
             ("toyworld", toyworld_argv(folder)), ("demo", ["--output", folder, "--num-bags", "64"])]
    folder.chmod(0o555)
    try:
        results = run_mains([(m, argv, None, folder) for m, argv in cases], prefix)
    finally:
        folder.chmod(0o755)
    for (module, argv), (status, message, files) in zip(cases, results):
        assert_one_line(status, message, folder)
        assert "ermission denied" in message or "not writable" in message, message
        assert files == [], (module, files)


def test_an_output_that_is_a_file_or_lies_under_one_is_one_line(world, tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("mine")
    for out in (file, file / "below"):
        cases = [(cdgmae.main, train_argv(world, out)), (gv.main, generate_argv(world, out)),
                 (gv.main, knn_argv(world, out)), (pr.main, propagate_argv(world, out)),
                 (pr.main, own_video_argv(world, out)), (tw.main, toyworld_argv(out)),
                 (demo.main, ["--output", out, "--num-bags", "64"]),
                 (metrics.main, metrics_argv(world, out / "t.csv")), (ev.main, evaluate_argv(world, out / "s.csv"))]
        for main, argv in cases:
            status, message = cli(main, argv, capsys)
            assert_one_line(status, message, file, "not a folder")
            assert file.read_text() == "mine" and os.listdir(tmp_path) == ["a-file"]
    for main, argv in [(metrics.main, metrics_argv(world, tmp_path)), (ev.main, evaluate_argv(world, tmp_path))]:
        status, message = cli(main, argv, capsys)  # a folder given where the CSV file goes
        assert_one_line(status, message, tmp_path, "a folder")
        assert os.listdir(tmp_path) == ["a-file"]


def test_an_output_inside_its_input_is_refused_before_any_work(world, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(world / "bags", data / "bags")
    shutil.copytree(world / "DAVIS", data / "DAVIS")
    shutil.copytree(world / "images", data / "images")
    before = tree_bytes(data)
    for main, argv, flag in [
            (cdgmae.main, train_argv(world, data / "bags" / "run", "--data", data / "bags"), "--data"),
            (cdgmae.main, train_argv(world, data / "bags", "--data", data / "bags"), "--data"),
            (pr.main, propagate_argv(world, data / "DAVIS" / "Annotations" / "480p", data=data / "DAVIS"),
             "--data-root"),  # predictions over the ground truth: the video would be "done" and score 100
            (gv.main, knn_argv(world, data / "images" / "knn", images=data / "images"), "--images")]:
        status, message = cli(main, argv, capsys)
        assert_one_line(status, message, "lies inside", flag)
        assert tree_bytes(data) == before
    # --csv inside an input folder is harmless: no script reads a .csv as an image or a frame
    assert metrics.main([str(a) for a in metrics_argv(world, data / "images" / "t.csv")])


def test_a_symbolic_link_that_loops_is_one_line_and_deeper_links_are_not_followed(world, tmp_path, capsys):
    bags = tmp_path / "bags"
    shutil.copytree(world / "bags", bags)
    os.symlink("loop", bags / "class0" / "loop")        # deeper: a file that cannot be opened, not a bag
    os.symlink("..", bags / "class1" / "up")            # deeper: not followed (os.walk), no bag listed twice
    status, _ = cli(cdgmae.main, train_argv(world, tmp_path / "run", "--data", bags, "--max-steps", "1"), capsys)
    assert status == 0
    assert json.loads((tmp_path / "run" / "bag-index.json").read_text())["bags"] == common.find_bags(world / "bags")
    for name, target in [("loop", "loop"), ("again", "."), ("parent", ".."), ("inside", "class0")]:
        link = bags / name
        os.symlink(target, link)
        for main, argv in [(cdgmae.main, train_argv(world, tmp_path / name, "--data", bags)),
                           (metrics.main, metrics_argv(world, tmp_path / f"{name}.csv", bags=bags))]:
            status, message = cli(main, argv, capsys)
            assert_one_line(status, message, link, "link")
            assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.csv").exists()
        link.unlink()
    images = tmp_path / "images"
    shutil.copytree(world / "images", images)
    os.symlink("loop.jpg", images / "n01" / "loop.jpg")  # an "image" that is a loop: skipped and listed
    os.symlink("..", images / "n02" / "up")
    summary = gv.main([str(a) for a in generate_argv(world, tmp_path / "gen", images=images)])
    assert summary["unreadable"][0][0] == "n01/loop.jpg" and summary["generated"] == 3
    davis = tmp_path / "DAVIS"
    shutil.copytree(world / "DAVIS", davis)
    frame = davis / "JPEGImages/480p/seq/00003.jpg"
    frame.unlink()
    os.symlink(frame.name, frame)  # a frame that is a loop
    status, message = cli(pr.main, propagate_argv(world, tmp_path / "pred", data=davis), capsys)
    assert_one_line(status, message, frame, "symbolic links")
    assert not (tmp_path / "pred").exists()


def test_names_that_would_break_a_line_are_refused_and_a_leading_dash_is_a_name(world, tmp_path, capsys,
                                                                                 monkeypatch):
    # bad_bags.txt, the problem lists and unreadable-shard*.txt hold "name<TAB>reason" lines
    for i, odd in enumerate(["img\n9", "img\t9"]):
        bags = tmp_path / f"bags{i}"
        shutil.copytree(world / "bags", bags)
        shutil.copytree(bags / "class0" / "img000", bags / "class0" / odd)
        status, message = cli(cdgmae.main, train_argv(world, tmp_path / "run", "--data", bags), capsys)
        assert_one_line(status, message, bags, repr(f"class0/{odd}"))
        images = tmp_path / f"images{i}"
        shutil.copytree(world / "images", images)
        shutil.copy(images / "n01" / "a.JPEG", images / "n01" / f"{odd}.jpg")
        status, message = cli(gv.main, generate_argv(world, tmp_path / "gen", images=images), capsys)
        assert_one_line(status, message, images, repr(f"n01/{odd}.jpg"))
        assert not (tmp_path / "run").exists() and not (tmp_path / "gen").exists()
    # a name that starts with "-" is a name: in the data, and in a command line a script builds
    images = tmp_path / "dash"
    shutil.copytree(world / "images", images)
    shutil.copy(images / "n01" / "a.JPEG", images / "n01" / "-a2.jpg")
    gv.main([str(a) for a in generate_argv(world, tmp_path / "dash-bags", images=images)])
    assert "n01/-a2" in common.find_bags(tmp_path / "dash-bags")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(world / "DAVIS", tmp_path / "-DAVIS")
    result = pr.main(["--dataset", "davis", "--data-root=-DAVIS", f"--checkpoint={world / 'vit.pth'}",
                      "--output=-pred", "--input-size", str(H), str(W), "--device", "cpu", "--evaluate"])
    assert result["written"] == ["seq"] and (tmp_path / "-pred" / "davis_scores.csv").exists()
    args = demo.get_args_parser().parse_args(["--output=-demo"])
    parsed = cdgmae.get_args_parser().parse_args(demo.training_argv(Path("-demo/toy"), Path("-demo/train"), args))
    assert (parsed.data, parsed.output) == ("-demo/toy/bags", "-demo/train")


# -----------------------------------------------------------------------------
# Numeric flags
# -----------------------------------------------------------------------------

def recorded_options(make_parser):
    """Every option that `make_parser()` adds (sub-commands' included) as its argparse.Action.
    argparse lists no parser's options publicly, but each option is an Action, so the factory runs
    with the Action constructor recorded."""
    made = []
    original = argparse.Action.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)
    argparse.Action.__init__ = record
    try:
        parser = make_parser()
    finally:
        argparse.Action.__init__ = original
    return parser, [a for a in made if a.option_strings]


def is_numeric(action):
    """An option whose type turns some text into a number (its range decides which text)."""
    for text in ("1", "0.5", "16", "100", "1000"):
        try:
            value = action.type(text) if action.type else None
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            continue
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return False


TOYWORLD_COMMANDS = [[command, "--output", "x"] for command in ("bags", "davis", "vip", "jhmdb", "all")]
PARSERS = {  # script: (parser factory, the argv prefixes that reach its options)
    "cdgmae.py": (cdgmae.get_args_parser, [[]]),
    "generate_views.py": (gv.get_args_parser, [[]]),
    "generate_views.py convert": (gv.get_convert_parser, [[]]),
    "generate_views.py knn": (gv.get_knn_parser, [[]]),
    "metrics.py": (metrics.get_args_parser, [[]]),
    "metrics.py overlap": (metrics.get_overlap_parser, [[]]),
    "propagate.py": (pr.get_args_parser, [[]]),
    "evaluate.py": (ev.get_args_parser, [[]]),
    "toyworld.py": (tw.get_args_parser, TOYWORLD_COMMANDS),
    "demo.py": (demo.get_args_parser, [[]]),
}
ZERO_IS_A_VALUE = {  # options where 0 means something; every other numeric option must refuse it
    "--seed", "--seeds", "--dift-seed",                                  # a seed
    "--workers",                                                         # load in the main process
    "--anchor-mask", "--decoder-dropout", "--min-lr", "--warmup-epochs",  # the paper's r_a = 0, no dropout, ...
    "--weight-decay", "--betas", "--guidance",                           # ..., w = 0: conditional
    "--vis-every", "metrics.py overlap --size",                          # never; keep the sizes
    "--queue-length", "--dift-timestep", "--dift-up-block",              # frame 0 only; t = 0; the first block
    "--light", "--spin", "--camouflage", "--distractors",                # the toy world without that difficulty
}
BELOW_MINUS_ONE = {"--guidance"}  # w = -1 is the S-LDM's unconditional prediction; below it is refused


def refusal(parser, argv, capsys):
    """The exit status and the last stderr line of parser.parse_args(argv)."""
    try:
        parser.parse_args(argv)
        return 0, ""
    except SystemExit as e:
        return e.code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("script", PARSERS)
def test_every_numeric_flag_refuses_nan_infinities_negatives_and_a_meaningless_zero(script, capsys):
    """Any option of any script whose type parses numbers: nan, inf, -inf and -1 (and 0, unless 0
    means something: ZERO_IS_A_VALUE) are one argparse line naming it, exit 2. A new numeric flag
    with a plain type=int / type=float, or a loose range, makes this test fail."""
    make_parser, prefixes = PARSERS[script]
    parser, options = recorded_options(make_parser)
    numeric = [a for a in options if is_numeric(a)]
    assert numeric
    for action in numeric:
        flag = action.option_strings[-1]
        count = action.nargs if isinstance(action.nargs, int) else 1
        zero = flag in ZERO_IS_A_VALUE or f"{script} {flag}" in ZERO_IS_A_VALUE
        negative = "-2" if flag in BELOW_MINUS_ONE else "-1"
        for value in ["nan", "inf", "-inf", negative] + ([] if zero else ["0"]):
            outcomes = [refusal(parser, [*prefix, flag, *[value] * count], capsys) for prefix in prefixes]
            named = [status == 2 and f"argument {flag}: " in line for status, line in outcomes]
            absent = [status == 2 and "unrecognized arguments" in line for status, line in outcomes]
            assert any(named) and all(n or a for n, a in zip(named, absent)), (script, flag, value, outcomes)


@pytest.mark.parametrize("main, argv, flag", [
    (cdgmae.main, ["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr"),                 # a minimum above the peak
    (cdgmae.main, ["--blr", "1e-4", "--batch-size", "256", "--min-lr", "2e-4"], "--min-lr"),
    (cdgmae.main, ["--seed", str(2 ** 32)], "--seed"),                              # seed * 1_000_003 overflows
    (cdgmae.main, ["--dist-timeout", "1e13"], "--dist-timeout"),                    # a timedelta overflows
    (metrics.main, ["--checkpoint", "x", "--images", "x", "--knn", "5", "--knn-pool", "5"], "--knn-pool"),
    (metrics.main, ["overlap", "a.jpg", "b.jpg", "--size", "8", "--patch-size", "16"], "--size"),
    (pr.main, ["--checkpoint", "x", "--output", "x", "--temperature", "1e-40"], "--temperature"),  # NaN labels
    (tw.main, ["davis", "--output", "x", "--distractors", "3", "2"], "--distractors"),
    (demo.main, ["--num-bags", "10", "--batch-size", "64"], "--batch-size"),         # not one step of data
    (demo.main, ["--compare", "--train-videos", "8", "--batch-size", "16", "--num-bags", "32"], "--batch-size"),
    (demo.main, ["--compare", "--methods", "knn", "--num-bags", "5", "--batch-size", "4"], "--num-bags"),
    (demo.main, ["--seed", str(2 ** 32)], "--seed"),
])
def test_flags_that_contradict_each_other_or_overflow_are_one_argparse_line(main, argv, flag, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, message = cli(main, argv, capsys)
    assert status == 2 and f"argument {flag}: " in message, message
    assert os.listdir(tmp_path) == []  # refused before any file was written


# -----------------------------------------------------------------------------
# Interrupts
# -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_inputs(tmp_path_factory):
    """Inputs that keep each script busy for about a second after its first output: 12 images
    (generation at 20 DDIM steps), 40 images (the metrics' 500 pairs a set), 8 DAVIS videos of 12
    frames of 96x128 (propagation)."""
    root = tmp_path_factory.mktemp("long")
    tiny_sldm_folder(root)
    tiny_checkpoint(root / "vit.pth")
    rng = np.random.default_rng(0)
    for i in range(40):
        (root / "images" / f"{i // 12}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"{i // 12}" / f"{i}.png")
    for name in [f"v{i}" for i in range(8)]:
        (root / "DAVIS/JPEGImages/480p" / name).mkdir(parents=True)
        ids = np.zeros((96, 128), np.uint8)
        ids[20:50, 30:70] = 1
        for t in range(12):
            Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(
                root / f"DAVIS/JPEGImages/480p/{name}/{t:05d}.jpg")
            ev.write_palette_png(root / f"DAVIS/Annotations/480p/{name}/{t:05d}.png", ids)
    (root / "DAVIS/ImageSets/2017").mkdir(parents=True)
    (root / "DAVIS/ImageSets/2017/val.txt").write_text("".join(f"v{i}\n" for i in range(8)))
    return root


def long_generate_argv(inputs, out):
    return ["--images", inputs / "images" / "0", "--model", inputs / "model", "--output", out, "--views", "2",
            "--steps", "20", "--batch-size", "1", "--workers", "0", "--device", "cpu", "--no-progress"]


def long_propagate_argv(inputs, out):
    return ["--dataset", "davis", "--data-root", inputs / "DAVIS", "--checkpoint", inputs / "vit.pth", "--output", out,
            "--input-size", "96", "128", "--device", "cpu"]


def long_metrics_argv(inputs, csv):
    return ["--checkpoint", inputs / "vit.pth", "--images", inputs / "images", "--num-pairs", "500", "--knn", "2",
            "--input-size", "64", "--workers", "0", "--device", "cpu", "--no-overlap", "--csv", csv]


def command_line(script, argv, cwd):
    """The script run as a command from the folder `cwd` (not the repository's), one thread."""
    return subprocess.run([sys.executable, ROOT / script, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def interrupted(script, argv, cwd, signum, first_output):
    """Start the command, send it `signum` once its first output appears (first_output: a function
    that tells whether a file of it exists, or a text it prints), wait: (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, ROOT / script, *map(str, argv)], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    printed, deadline = [], time.time() + 300
    if isinstance(first_output, str):
        for line in proc.stderr:
            printed.append(line)
            if first_output in line:
                break
    else:
        while not first_output() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
    proc.send_signal(signum)
    return proc.wait(timeout=300), "".join(printed) + proc.stderr.read()


def assert_interrupted(status, err, signum):
    """Exit status 128 + the signal (the shell's convention), one line saying how to go on."""
    assert status == 128 + signum, (status, err[-2000:])
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"interrupted by {signal.Signals(signum).name}; rerun the same command")


@pytest.fixture(scope="module")
def uninterrupted_bags(long_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "bags"
    assert command_line("generate_views.py", long_generate_argv(long_inputs, out), out.parent).returncode == 0
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_generation_stopped_by_a_signal_resumes_to_the_bags_of_an_uninterrupted_run(long_inputs, uninterrupted_bags,
                                                                                  tmp_path, signum):
    bags = tmp_path / "bags"
    status, err = interrupted("generate_views.py", long_generate_argv(long_inputs, bags), tmp_path, signum,
                              lambda: any(bags.rglob("real.*")))
    assert_interrupted(status, err, signum)
    assert leftovers(bags) == []
    finished = common.find_bags(bags)  # a bag is listed once its real image is in: it must be whole
    assert 1 <= len(finished) < 12 and all(gv.bag_is_complete(bags / bag, 2) for bag in finished)
    assert command_line("generate_views.py", long_generate_argv(long_inputs, bags), tmp_path).returncode == 0
    assert tree_bytes(bags) == tree_bytes(uninterrupted_bags)


def test_propagation_stopped_by_sigterm_resumes_to_the_predictions_of_an_uninterrupted_run(long_inputs, tmp_path):
    out = tmp_path / "pred"
    videos = lambda: [p for p in out.iterdir() if not p.name.startswith(".") and p.is_dir()] if out.exists() else []  # noqa: E731
    status, err = interrupted("propagate.py", long_propagate_argv(long_inputs, out), tmp_path, signal.SIGTERM,
                              lambda: videos())
    assert_interrupted(status, err, signal.SIGTERM)
    assert leftovers(out) == []
    assert 1 <= len(videos()) < 8 and all(len(os.listdir(v)) == 12 for v in videos())  # finished videos are whole
    assert command_line("propagate.py", long_propagate_argv(long_inputs, out), tmp_path).returncode == 0
    assert command_line("propagate.py", long_propagate_argv(long_inputs, tmp_path / "clean"), tmp_path).returncode == 0
    assert tree_bytes(out) == tree_bytes(tmp_path / "clean")


def test_metrics_stopped_by_sigint_writes_no_table_and_the_rerun_writes_the_uninterrupted_one(long_inputs, tmp_path):
    status, err = interrupted("metrics.py", long_metrics_argv(long_inputs, tmp_path / "table.csv"), tmp_path,
                              signal.SIGINT, "features on")
    assert_interrupted(status, err, signal.SIGINT)
    assert os.listdir(tmp_path) == []  # no table, no temporary
    assert command_line("metrics.py", long_metrics_argv(long_inputs, tmp_path / "table.csv"), tmp_path).returncode == 0
    assert command_line("metrics.py", long_metrics_argv(long_inputs, tmp_path / "clean.csv"), tmp_path).returncode == 0
    assert (tmp_path / "table.csv").read_bytes() == (tmp_path / "clean.csv").read_bytes()


def test_an_interrupt_during_an_atomic_write_leaves_no_file(tmp_path):
    def half_then_interrupted(tmp):
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt
    for write in (common.atomic_write, common.atomic_write):
        with pytest.raises(KeyboardInterrupt):
            write(tmp_path / "out.png", half_then_interrupted)
        assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# The environment
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("env, named", [
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1"),   # a rank outside its world
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ({"RANK": "x"}, "RANK=x"),
    ({"WORLD_SIZE": "2.0", "RANK": "1"}, "WORLD_SIZE=2.0"),
    ({"LOCAL_RANK": "1"}, "LOCAL_RANK=1"),          # a local rank above the global one
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1"),
])
def test_inconsistent_torchrun_variables_are_one_line_naming_the_variable(world, tmp_path, capsys, monkeypatch,
                                                                          env, named):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for main, argv in [(cdgmae.main, train_argv(world, tmp_path / "run")), (gv.main, generate_argv(world, tmp_path / "gen"))]:
        status, message = cli(main, argv, capsys)
        assert_one_line(status, message, named, "torchrun")
        assert os.listdir(tmp_path) == []


def test_several_ranks_without_torchrun_are_one_line_and_torchrun_on_a_cpu_works(world, tmp_path, capsys, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    status, message = cli(cdgmae.main, train_argv(world, tmp_path / "run"), capsys)
    assert_one_line(status, message, "WORLD_SIZE=2", "MASTER_ADDR")  # instead of waiting for a rank that never comes
    assert not (tmp_path / "run").exists()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    # torchrun, two processes on a CPU: the bags of one process (training's gloo run: test_cdgmae.py)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           ROOT / "generate_views.py", *map(str, generate_argv(world, tmp_path / "two"))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert command_line("generate_views.py", generate_argv(world, tmp_path / "one"), tmp_path).returncode == 0
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")


def test_an_invalid_omp_num_threads_is_libgomps_warning_and_the_run_works(world, tmp_path):
    done = subprocess.run([sys.executable, ROOT / "cdgmae.py", *map(str, train_argv(world, tmp_path / "run",
                                                                               "--max-steps", "1"))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "0"})
    assert done.returncode == 0 and (tmp_path / "run" / "checkpoint-last.pth").exists(), done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_a_run_resumed_from_another_working_folder_compares_the_real_data_folder(world, tmp_path, capsys, monkeypatch):
    for name in ("a", "b"):  # two copies of the same bags: the same bag list, other folders
        shutil.copytree(world / "bags", tmp_path / name / "bags")
    monkeypatch.chdir(tmp_path / "a")
    argv = train_argv(world, "run", "--data", "bags", "--max-steps", "1")
    assert cli(cdgmae.main, argv, capsys)[0] == 0
    monkeypatch.chdir(tmp_path)  # the same folder under another relative name: resumed
    status, message = cli(cdgmae.main, train_argv(world, "a/run", "--data", "a/bags", "--resume", "auto"), capsys)
    assert status == 0, message
    assert torch.load(tmp_path / "a/run/checkpoint-last.pth", weights_only=True)["global_step"] == 2
    monkeypatch.chdir(tmp_path / "b")  # the same relative name of another folder: refused
    status, message = cli(cdgmae.main, train_argv(world, "../a/run", "--data", "bags", "--resume", "auto",
                                                  "--epochs", "2"), capsys)
    assert_one_line(status, message, "--data", str(tmp_path / "b" / "bags"))


def test_an_interrupt_ends_the_command_with_one_line_and_the_shells_exit_status(capsys):
    """run_command (cdgmae.py's, and evaluate.py's torch-free twin for it and toyworld.py): SIGTERM
    and SIGINT stop main() through `finally` blocks, one line, exit status 128 + the signal."""
    previous = signal.getsignal(signal.SIGTERM)

    def killed():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # the handler interrupts the sleep

    def interrupted_by_ctrl_c():
        raise KeyboardInterrupt
    try:
        for run_command in (common.run_command, common.run_command):
            for main, signum in [(killed, signal.SIGTERM), (interrupted_by_ctrl_c, signal.SIGINT)]:
                with pytest.raises(SystemExit) as stop:
                    run_command(main)
                err = capsys.readouterr().err
                assert stop.value.code == 128 + signum and len(err.strip().splitlines()) == 1, err
                assert err.startswith(f"interrupted by {signal.Signals(signum).name}; rerun the same command")
    finally:
        signal.signal(signal.SIGTERM, previous)
