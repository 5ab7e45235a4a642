"""benchmarks/dynamics.py: the quick run writes its tables, and what it times is the library's
decomposition, equal to the floor's JVP along the training gradient. No test asserts a timing."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np

from benchmarks import dynamics as bench
from benchmarks import train as bench_train
from ldjax import sequence_dynamics as sd
import pytest



@pytest.mark.experiment  # an end-to-end run (minutes): make test-experiments
def test_quick_run_writes_tables_and_ties_decomposition_to_floor(tmp_path):
    report = bench.main(bench.Config(quick=True, out=str(tmp_path)))
    md = (tmp_path / "dynamics.md").read_text()
    on_disk = json.loads((tmp_path / "dynamics.json").read_text())
    assert "## Must-show" in md and "## 1. Decomposition" in md and "## 2. Tracker overhead" in md
    assert on_disk["must_show"].keys() == report["must_show"].keys()

    (dec,) = report["decomposition"]
    for row in dec["rows"]:
        assert row["decomposition_s"] > 0 and row["floor_s"] > 0
        # The timed decomposition (predict_sgd) and the floor (grad + JVP of token_logps) agree.
        assert row["check"]["rel"] < 1e-4, row["check"]
        assert row["check"]["max_abs"] > 0
    (trk,) = report["tracking"]
    assert trk["variants"]["tracker"]["evals"] == trk["steps"] // trk["every"] + 1
    # The fused scorer scores what the library's scorer scores.
    assert trk["score_max_abs_diff_vs_library"]["tracker_fused"] < 1e-3


def test_floor_is_the_decomposition_of_the_training_gradient():
    """The floor's function, called directly, equals predict_sgd (total tokens) for padded rows
    and a chunk that does not divide the observed batch."""
    size = bench_train.SIZES["tiny"]
    model = bench.build_model(size, "gpt_neox", seed=1)
    apply_fn, params = sd.lm_apply_fn(model)
    rng = np.random.default_rng(1)
    update = {k: jnp.asarray(v) for k, v in bench_train.make_sequence_batch(rng, size.vocab_size, 3, 12, pad=True).items()}
    observed = {k: jnp.asarray(v) for k, v in bench_train.make_sequence_batch(rng, size.vocab_size, 5, 10, pad=True).items()}
    want = np.asarray(bench.decompose(apply_fn, params, update, observed, 0.1, 2))
    got = np.asarray(bench.floor_fn(apply_fn, params, update, observed, 0.1, chunk=2, readout="logps"))
    assert got.shape == want.shape == (5, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
