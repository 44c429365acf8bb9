"""Faults of a training run (issue 9): each test covers one class of fault and asserts the exit
status, that the one-line message names the file or flag, that no traceback is printed and
that nothing of the run was overwritten."""
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cdgmae

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--decoder-dim", "32", "--decoder-depth", "1",
        "--decoder-heads", "2", "--decoder-ffn-dim", "64", "--patch-size", "8", "--input-size", "32",
        "--workers", "0", "--log-every", "1", "--vis-every", "0"]


def write_bags(root, num_bags=8, views=3):
    rng = np.random.default_rng(0)
    for i in range(num_bags):
        bag = root / f"class{i % 2}" / f"img{i:03d}"
        bag.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(bag / "real.jpg")
        for k in range(views):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(bag / f"view_{k:02d}.jpg")
    return root


def common(root):
    return ["--data", str(root), "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1",
            "--anchors", "2", "--anchor-mask", "0.25", *TINY]


def run(argv, capsys):
    """cdgmae.main in-process -> (exit status, its stderr followed by the exit message, if any)."""
    try:
        cdgmae.main(argv)
        code, message = 0, ""
    except SystemExit as e:
        code, message = (e.code, "") if isinstance(e.code, int) else (1, str(e.code))
    return code, capsys.readouterr().err + message


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """Bags and a run stopped after 2 of its 4 steps (2 epochs of 2 steps)."""
    base = tmp_path_factory.mktemp("faults")
    bags = write_bags(base / "bags")
    cdgmae.main([*common(bags), "--output", str(base / "run"), "--max-steps", "2"])
    return bags, base / "run"


@pytest.fixture
def run_copy(stopped_run, tmp_path):
    bags, run_dir = stopped_run
    shutil.copytree(run_dir, tmp_path / "run")
    return bags, tmp_path / "run"


def test_a_new_run_in_a_folder_holding_a_run_is_refused_from_the_command_line(run_copy):
    bags, out = run_copy
    before = snapshot(out)
    result = subprocess.run([sys.executable, str(ROOT / "cdgmae.py"), *common(bags), "--output", str(out)],
                            capture_output=True, text=True, cwd=out.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert str(out) in result.stderr and "checkpoint-last.pth" in result.stderr and "--resume auto" in result.stderr
    assert snapshot(out) == before


@pytest.mark.parametrize("change", [["--batch-size", "8"], ["--anchors", "3"], ["--anchor-mask", "0.5"],
                                    ["--no-norm-pix-loss"], ["--seed", "1"], ["--lr", "1e-3"], ["--epochs", "3"],
                                    ["--crop-scale", "0.3", "1"], ["--decoder-depth", "2"], ["--target-view", "real"]])
def test_a_resume_that_would_change_the_computation_is_refused_with_the_differences(run_copy, capsys, change):
    bags, out = run_copy
    before = snapshot(out)
    flag = change[0].replace("--no-", "--")
    code, message = run([*common(bags), "--output", str(out), "--resume", "auto", *change], capsys)
    assert code == 1 and "Traceback" not in message
    assert message.startswith(f"{out / 'checkpoint-last.pth'}:") and flag in message
    assert snapshot(out) == before


def test_several_differences_are_listed_in_one_message(run_copy, capsys):
    bags, out = run_copy
    code, message = run([*common(bags), "--output", str(out), "--resume", "auto", "--batch-size", "8",
                         "--seed", "3", "--anchors", "3"], capsys)
    assert code == 1 and len(message.strip().splitlines()) == 1
    assert all(f in message for f in ("--batch-size: 4 -> 8", "--seed: 0 -> 3", "--anchors: 2 -> 3"))


def test_settings_that_cannot_change_the_result_may_differ_and_the_log_is_not_duplicated(run_copy, capsys):
    bags, out = run_copy
    (out / "log.jsonl").write_text((out / "log.jsonl").read_text() + '{"epoch": 0, "step": 3, "lo')  # killed mid-line
    code, message = run([*common(bags), "--output", str(out), "--resume", "auto", "--log-every", "2",
                         "--verify-images", "none", "--save-every", "1"], capsys)
    assert code == 0, message
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 4]  # steps 1-2 kept from the first part, then every 2nd step and each epoch's last
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["global_step"] == 4


def test_epochs_may_grow_once_the_run_has_finished_them(run_copy, capsys):
    bags, out = run_copy
    assert run([*common(bags), "--output", str(out), "--resume", "auto"], capsys)[0] == 0  # finish 2 epochs
    code, message = run([*common(bags), "--output", str(out), "--resume", "auto", "--epochs", "3"], capsys)
    assert code == 0, message
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["next_epoch"], ckpt["global_step"]) == (3, 6)


@pytest.mark.parametrize("content", ["garbage", "empty", "state_dict", "pickle"])
def test_an_unreadable_or_foreign_checkpoint_is_refused_naming_it(run_copy, tmp_path, capsys, content):
    bags, out = run_copy
    path = tmp_path / "other.pth"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "state_dict":  # e.g. an MAE or DINO backbone
        torch.save({"model": {"w": torch.zeros(2)}}, path)
    else:  # an object that weights_only refuses to unpickle
        torch.save({"model": {}, "x": Path("x")}, path)
    fresh = tmp_path / "fresh"
    code, message = run([*common(bags), "--output", str(fresh), "--resume", str(path)], capsys)
    assert code == 1 and "Traceback" not in message and len(message.strip().splitlines()) == 1
    assert message.startswith(f"{path}:")
    assert not fresh.exists()


def test_a_checkpoint_from_elsewhere_into_a_folder_holding_a_run_is_refused(run_copy, tmp_path, capsys):
    bags, out = run_copy
    other = tmp_path / "elsewhere.pth"
    shutil.copy(out / "checkpoint-last.pth", other)
    before = snapshot(out)
    code, message = run([*common(bags), "--output", str(out), "--resume", str(other)], capsys)
    assert code == 1 and str(out) in message and "--resume" in message
    assert snapshot(out) == before


BAD_FLAGS = [("--anchors", "0"), ("--epochs", "0"), ("--batch-size", "-2"), ("--accum-iter", "0"), ("--workers", "-1"),
             ("--views", "0"), ("--patch-size", "0"), ("--depth", "0"), ("--num-heads", "0"), ("--embed-dim", "0"),
             ("--decoder-heads", "0"), ("--anchor-mask", "1"), ("--anchor-mask", "-0.1"), ("--target-mask", "0"),
             ("--target-mask", "1"), ("--lr", "0"), ("--blr", "-1"), ("--warmup-epochs", "-1"), ("--betas", "0.9 1"),
             ("--crop-scale", "2 3"), ("--crop-scale", "0 1"), ("--crop-ratio", "0 1"), ("--seed", "-1"),
             ("--input-size", "nan"), ("--max-steps", "0"), ("--log-every", "0"), ("--dist-timeout", "0")]


@pytest.mark.parametrize("flag, value", BAD_FLAGS)
def test_every_out_of_range_flag_is_one_argparse_line(tmp_path, capsys, flag, value):
    code, message = run(["--data", str(tmp_path), "--output", str(tmp_path / "run"), flag, *value.split()], capsys)
    assert code == 2 and "Traceback" not in message
    assert f"argument {flag}" in message.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, flag", [(["--input-size", "30", "--patch-size", "16"], "--input-size"),
                                        (["--embed-dim", "32", "--num-heads", "3"], "--num-heads"),
                                        (["--decoder-dim", "36", "--decoder-heads", "8"], "--decoder-heads"),
                                        (["--embed-dim", "30", "--num-heads", "2"], "--embed-dim"),
                                        (["--crop-scale", "0.9", "0.5"], "--crop-scale"),
                                        (["--crop-ratio", "2", "1"], "--crop-ratio"),
                                        (["--batch-size", "10", "--accum-iter", "4"], "--accum-iter")])
def test_flags_that_contradict_each_other_are_one_argparse_line(tmp_path, capsys, argv, flag):
    code, message = run(["--data", str(tmp_path), *argv], capsys)
    assert code == 2 and f"argument {flag}" in message and "Traceback" not in message


def test_without_data_the_default_folder_is_read_or_the_message_says_how_to_make_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, message = run(["--output", "run", *TINY], capsys)
    assert code == 1 and len(message.strip().splitlines()) == 1
    assert message.startswith("data/bags:") and "python toyworld.py bags --output data/bags" in message
    assert "generate_views.py" in message
    write_bags(tmp_path / "data" / "bags")
    code, message = run(["--output", "run", "--batch-size", "4", "--max-steps", "1", *TINY], capsys)
    assert code == 0, message
    assert (tmp_path / "run" / "checkpoint-last.pth").exists()


def test_a_bag_whose_image_cannot_be_decoded_is_replaced_the_same_way_every_run(tmp_path, capsys):
    bags = write_bags(tmp_path / "bags")
    bad = bags / "class1" / "img003" / "real.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) * 2 // 3])  # truncated: the header parses, the pixels do not
    argv = [*common(bags), "--anchors", "3", "--epochs", "2"]  # every image of a bag is used
    code, message = run([*argv, "--output", str(tmp_path / "a")], capsys)
    assert code == 0, message
    assert message.count("warning:") == 1 and str(bad) in message
    assert "class1/img003" in (tmp_path / "a" / "bad_bags.txt").read_text()
    # The substitute is a function of (seed, epoch, index): a stopped and resumed run replays it.
    assert run([*argv, "--output", str(tmp_path / "b"), "--max-steps", "1"], capsys)[0] == 0
    assert run([*argv, "--output", str(tmp_path / "b"), "--resume", "auto"], capsys)[0] == 0
    straight = torch.load(tmp_path / "a" / "checkpoint-last.pth", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "b" / "checkpoint-last.pth", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # A full decode at start-up finds it before any training.
    code, message = run([*argv, "--output", str(tmp_path / "c"), "--verify-images", "decode"], capsys)
    assert code == 1 and "img003: real.jpg: cannot decode image" in message and "Traceback" not in message
    assert not (tmp_path / "c" / "checkpoint-last.pth").exists()


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(run_copy, capsys, monkeypatch):
    bags, out = run_copy
    before = snapshot(out)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if hasattr(f, "write"):
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk)
    code, message = run([*common(bags), "--output", str(out), "--resume", "auto"], capsys)
    assert code == 1 and "Traceback" not in message
    assert message.strip().splitlines()[-1].startswith(f"{out / 'checkpoint-last.pth'}: cannot write the checkpoint")
    assert "No space left on device" in message
    after = snapshot(out)
    assert after[Path("checkpoint-last.pth")] == before[Path("checkpoint-last.pth")]
    assert after[Path("log.jsonl")].startswith(before[Path("log.jsonl")])  # steps 1-2 kept as they were
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--num-bags", "-1"), ("--anchors", "5"),
                                         ("--anchor-mask", "1"), ("--batch-size", "0"), ("--lr", "0")])
def test_demo_flags_are_checked_when_parsed(tmp_path, flag, value):
    result = subprocess.run([sys.executable, "demo.py", "--output", str(tmp_path / "demo"), flag, value],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and flag in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "demo").exists()  # stopped before the toy world is drawn
