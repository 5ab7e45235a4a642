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
    v = trk["variants"]
    assert tuple(v) == bench.TRACK_VARIANTS
    for name in bench.TRACK_VARIANTS[1:]:
        assert v[name]["evals"] == trk["steps"] // trk["every"] + 1
        assert v[name]["steady_eval_s"] > 0 and v[name]["steady_overhead"] > 0 and v[name]["full_eval_s"] > 0
        key = f"tracking_tiny_{name}_steady_overhead"
        assert report["must_show"][key]["value"] == v[name]["steady_overhead"]
    # The subset tracker scores m prompts between its full first and last evaluations.
    assert v["tracker_subset"]["prompts_per_eval"] == trk["subset"] < trk["num_prompts"]
    assert v["tracker_fused"]["prompts_per_eval"] == trk["num_prompts"]
    for run in trk["runs"]["tracker_subset"]:
        counts = [e["num_prompts"] for e in run["eval_times"]]
        assert counts[0] == counts[-1] == trk["num_prompts"] and set(counts[1:-1]) == {trk["subset"]}
    # The fused scorer (all prompts, and the subset's window) scores what the per-family scorer scores.
    assert trk["score_max_abs_diff_vs_library"]["tracker_fused"] < 1e-3
    assert trk["score_max_abs_diff_vs_library"]["tracker_subset"] < 1e-3
    assert [e["m"] for e in trk["subset_choice"]["scan"]] == sorted({1, trk["subset"]})
    # The estimate was checked against every prompt at an intermediate step.
    (row,) = trk["estimate_accuracy"]["rows"]
    assert 0 < row["step"] < trk["steps"] and len(row["prompts"]) == trk["subset"]
    assert np.isfinite(row["abs_err"]) and row["abs_err"] <= row["std"]
    assert "### The subset estimate's accuracy" in md and "tracker_subset" in md

    # Re-measuring only the tracking part keeps the decomposition of the existing report.
    new = dict(on_disk, decomposition=[], date="later", runs=None)
    merged = bench.merge_reports(on_disk, new, ("tracking",))
    assert merged["decomposition"] == on_disk["decomposition"]
    assert merged["runs"]["decomposition"]["date"] == on_disk["date"] and merged["runs"]["tracking"]["date"] == "later"
    assert merged["must_show"].keys() == report["must_show"].keys()
    assert "## 1. Decomposition" in bench.render_markdown(merged)


def test_merge_keeps_the_parts_not_run_and_rejects_unknown_parts(tmp_path):
    variant = {"overhead": 0.5, "steady_overhead": 0.05, "steady_eval_in_train_steps": 0.5, "prompts_per_eval": 2}
    old_tracking = [{"size": "4m", "families": ["chosen"], "num_prompts": 32, "train_batch_size": 8,
                     "variants": {v: dict(variant) for v in bench.TRACK_VARIANTS}}]
    old = {"date": "d0", "machine": {"m": 0}, "config": {"c": 0}, "must_show": {},
           "decomposition": [{"size": "4m", "best_ratio_to_floor": 1.2}], "tracking": old_tracking}
    new = {"date": "d1", "machine": {"m": 1}, "config": {"c": 1}, "decomposition": [], "tracking": []}
    merged = bench.merge_reports(old, new, ("decomposition",))
    assert merged["tracking"] == old_tracking and merged["decomposition"] == []
    assert merged["runs"]["tracking"] == {"date": "d0", "machine": {"m": 0}, "config": {"c": 0}}
    assert merged["runs"]["decomposition"]["date"] == "d1"
    assert merged["must_show"]["tracking_4m_tracker_subset_steady_overhead"]["met"]
    merged = bench.merge_reports(old, new, ("tracking",))
    assert merged["decomposition"] == old["decomposition"] and merged["tracking"] == []
    assert list(merged["must_show"]) == ["decomposition_4m_ratio_to_floor"]
    with pytest.raises(ValueError, match="--parts"):
        bench.main(bench.Config(parts=("bogus",), out=str(tmp_path)))


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
