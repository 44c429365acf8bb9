"""End to end on the toy world: CDG-MAE pre-training makes an encoder that propagates labels
better than the same encoder at its random initialisation (the paper's central claim, Sec. 4,
under its own protocol, Table 7), and toy bag views are consistent the way Table 1 says
generated views are.

This is the slowest test (about 4 minutes on 2 cores). It runs the demo's pipeline -- toy
bags, `cdgmae.main`, `propagate.py`, `evaluate.py` -- and stops training after the first 14
of the demo's 26 epochs (434 steps of 64 bags). It cannot be much shorter: in the first ~300
steps the features get *worse* than at initialisation (docs/toy_world.md, "It needs a few
hundred steps").

MARGIN comes from three seeds of exactly this run (world and training seeded alike): trained
minus random J&F on toy DAVIS at step 434 was +9.0 (40.73 against 31.75), +10.0 (44.34 against
34.32) and +7.9 (45.28 against 37.37) for seeds 0-2 (docs/toy_world.md). The bar is 6.5: the
smallest of the three, less 1.4 points for numerical differences between machines. The test
runs seed 0. Other CPU kernels move it by hundredths of a point: with torch's and oneDNN's
kernels capped at AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) seed 0 gave +9.01
(40.76 against 31.75), with ATen's baseline kernels and oneDNN's SSE4.1 ones (default, SSE41)
+9.03 (40.78 against 31.75).
"""
from pathlib import Path

import pytest

import cdgmae
import demo

STEPS = 434   # 14 epochs x 31 steps: the demo's schedule (26 epochs), stopped early
SEED = 0
MARGIN = 6.5  # J&F points; see the module docstring


def pretrain_and_score(out, seed, steps=STEPS):
    """The demo's pipeline with DAVIS only, training stopped after `steps`. Returns
    ({"trained": J&F, "random init": J&F}, trained encoder, toy-world root)."""
    out = Path(out)
    args = demo.get_args_parser().parse_args(["--output", str(out), "--seed", str(seed), "--datasets", "davis"])
    root, run = out / "toy", out / "train"
    demo.make_world(root, args)
    cdgmae.main(demo.training_argv(root, run, args) + ["--max-steps", str(steps)])
    encoders = {"trained": cdgmae.encoder_from_checkpoint(run / "checkpoint-last.pth").eval(),
                "random init": demo.initial_encoder(run)}
    scores = {name: demo.score(enc, root, out / "predictions" / name.replace(" ", "_"), ["davis"])["davis"]["J&F_m"]
              for name, enc in encoders.items()}
    return scores, encoders["trained"], root


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    return pretrain_and_score(tmp_path_factory.mktemp("demo"), SEED)


def test_pretraining_beats_the_random_encoder_on_toy_davis(short_run):
    scores, _, _ = short_run
    assert scores["trained"] - scores["random init"] >= MARGIN, scores


def test_toy_views_are_consistent_like_table_1(short_run):
    """Table 1: generated views (real vs view of one bag) keep far more of the global and local
    similarity than random image pairs -- they lie much nearer to video frames than to random
    pairs -- under GS, LS and NPS (Eq. 1-3)."""
    _, encoder, root = short_run
    table = demo.view_consistency(encoder, root, 100, SEED)
    video, bag, rand = (next(v for k, v in table.items() if k.startswith(prefix))
                        for prefix in ("Video frames", "Generated views", "Random images"))
    for m in ("gs", "ls", "nps"):
        assert video[m] > rand[m] and bag[m] > rand[m], (m, table)
        assert bag[m] - rand[m] > video[m] - bag[m], (m, table)
