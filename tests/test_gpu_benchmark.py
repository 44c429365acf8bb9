"""The GPU run (benchmarks/gpu.sh): its dry run goes through every stage on a CPU, so that the script
does not rot between the runs on a GPU, and a stage that overruns its cap costs only that stage."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu  # noqa: E402


def read(output):
    results = json.loads((output / "results.json").read_text())
    lines = (output / "results.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| ")][1:]  # the rows, after the header
    return results, table


def test_the_dry_run_writes_a_row_for_every_stage_into_json_and_markdown(tmp_path):
    output = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(output), "--dry-run",
                           "--scratch", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results, table = read(output)
    rows = results["rows"]
    assert {row["stage"] for row in rows} == set(bench_gpu.STAGES)
    assert len(table) == len(rows)  # the markdown is the same rows, one line each
    assert (output / "console.txt").read_text().startswith("mode: dry run")
    assert not [row for row in rows if row["status"] in ("failed", "timed out")]
    for row in rows:  # a figure where measured, a reason where skipped
        assert row["result"] if row["status"] == "measured" else row["status"] == "skipped" and row["note"]
    measured = {(row["stage"], row["case"]): row["values"] for row in rows if row["status"] == "measured"}
    assert measured[("model", "a3")]["samples_per_s"] > 0 and measured[("model", "a3")]["fraction_of_peak"] > 0
    assert measured[("end_to_end", "torchrun cdgmae.py, --decode cpu")]["samples_per_s"] > 0
    assert measured[("end_to_end", "loader only, --decode cpu")]["samples_per_s"] > 0
    assert [row["note"] for row in rows if row["case"] == "--decode gpu"] == [
        "needs a CUDA device and torchvision (nvJPEG)"] or torch.cuda.is_available()
    resumed = measured[("exactness", f"stopped after {bench_gpu.DRY['exact_stop']} steps, resumed")]
    assert resumed["steps"] == bench_gpu.DRY["exact_steps"] and resumed["params_bitwise"]
    assert {case for stage, case in measured if stage == "generation"} == {
        f"{b} real images per call" for b in bench_gpu.DRY["gen_batches"]}
    assert {case for stage, case in measured if stage == "propagation"} == {
        f"ViT-S/{p} {what}" for p in (16, 8) for what in ("features", "k-NN propagation")}
    assert len([case for stage, case in measured if stage == "compiled"]) == 2
    assert not list(tmp_path.glob("cdgmae-gpu-run-*"))  # the scratch folder is removed


def test_a_stage_that_overruns_its_cap_is_stopped_and_the_next_stage_still_runs(tmp_path):
    output = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), str(output), "--dry-run",
                    "--stages", "peak", "propagation", "--cap", "peak=0.05", "--scratch", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    results, table = read(output)
    statuses = [(row["stage"], row["status"]) for row in results["rows"]]
    # 0.05 s is less than a Python process needs to import torch.
    assert statuses[0] == ("peak", "timed out") and "cap of 0 s" in results["rows"][0]["note"]
    assert statuses[1:] == [("propagation", "measured")] * 4
    assert len(table) == 5


def test_an_output_folder_with_results_is_refused_in_one_line(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match=f"^{tmp_path}: holds the results of another run"):
        bench_gpu.main([str(tmp_path), "--dry-run"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_the_gpu_run_without_a_cuda_device_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="^no CUDA device here"):
        bench_gpu.main([str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
