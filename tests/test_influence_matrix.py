"""experiments.influence_matrix: unit tests of one row's accumulation (tiny float64 LM) and of the
claims / report on hand-made matrices; quick end-to-end runs (world and an HH file) marked
``experiment``."""
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import influence_matrix as im
from experiments.claims import read_claims
from ldjax import sequence_dynamics as sd
from ldjax.models.transformer import CausalLM, TransformerConfig

V, T, P = 13, 8, 3
FAMILIES = ("chosen", "rejected", "other_train")


def _probe_set(rng):
    """A stand-in ProbeSet: P prompts (2 tokens, shared by every family), one response per family."""
    prompts = rng.integers(0, V, (P, 2))
    arrays = {}
    for f in FAMILIES:
        ids = rng.integers(0, V, (P, T))
        ids[:, :2] = prompts
        att = np.zeros((P, T), np.int32)
        mask = np.zeros((P, T), np.int32)
        for i, n in enumerate(rng.integers(3, T - 2, P)):
            att[i, :2 + n] = 1
            mask[i, 2:2 + n] = 1
        arrays[f] = {"input_ids": ids.astype(np.int32), "attention_mask": att, "loss_mask": mask}
    return types.SimpleNamespace(arrays=arrays, num_prompts=P, families=FAMILIES)


@pytest.fixture(scope="module")
def tiny():
    cfg = TransformerConfig.tiny("gpt_neox", vocab_size=V, hidden_size=16, num_heads=2, intermediate_size=32,
                                 num_layers=1, initializer_range=0.3)
    model = CausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.float64, param_dtype=jnp.float64)
    apply_fn, params = sd.lm_apply_fn(model)
    probe_set = _probe_set(np.random.default_rng(0))
    observer = im.Observer(apply_fn, params, probe_set, list(FAMILIES), P, chunk_size=4)
    return apply_fn, params, probe_set, observer


@pytest.mark.parametrize("loss", ["sft", "dpo"])
def test_row_accumulates_exactly_to_second_order(tiny, loss):
    apply_fn, params, probe_set, observer = tiny
    objective = sd.SFTObjective() if loss == "sft" else sd.PreferenceObjective("sigmoid", beta=0.5)
    batch = im.update_batch(loss, probe_set, "rejected", P, apply_fn, params)
    eta = im.calibrate(observer, params, {"rejected": batch}, objective, 0.05)
    gaps = []
    for scale in (1.0, 0.5):
        r = im.run_row(observer, params, batch, objective, eta * scale, steps=2)
        pred, act = np.asarray(r["predicted"]), np.asarray(r["actual"])
        assert pred.shape == (len(FAMILIES) + 1,)  # every family, then the argmax path
        # the accumulated actual change telescopes: the sum of the per-step changes
        np.testing.assert_allclose(act, np.asarray(r["actual_steps"]).sum(0), rtol=1e-12)
        assert np.abs(pred - act).max() < 0.05 * np.abs(act).max(), (pred, act)
        if loss == "dpo":  # the chosen and y⁻ terms add up to the prediction (linear in the update)
            np.testing.assert_allclose(np.add(r["terms"]["chosen"], r["terms"]["rejected"]), pred, rtol=1e-9, atol=1e-14)
        assert r["loss"][-1] < r["loss"][0]
        gaps.append(np.abs(pred - act).max())
    # the first-order sum's error is O(η²): halving η (same number of steps) quarters it
    assert 3.0 < gaps[0] / gaps[1] < 5.0, gaps


def test_argmax_path_matches_its_definition(tiny):
    apply_fn, params, probe_set, observer = tiny
    chosen = probe_set.arrays["chosen"]
    logits = np.asarray(apply_fn(params, {"input_ids": jnp.asarray(chosen["input_ids"]),
                                          "attention_mask": jnp.asarray(chosen["attention_mask"])}))
    logp = jax.nn.log_softmax(logits, axis=-1)
    want = (np.asarray(logp)[:, :-1].max(-1) * (chosen["loss_mask"][:, 1:] != 0)).sum(-1)
    got = im.path_logps(apply_fn, params, *observer.path, observer.star)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def _per_seed(pred, act, rows, terms=None):
    rng = np.random.default_rng(0)
    r = {"sign_agreement": float(np.mean(np.sign(pred) == np.sign(act))), "eta": {t: 1e-3 for t in rows}, "prompts": 4,
         "predicted": pred.tolist(), "actual": act.tolist(),
         "rows": {t: {"predicted_steps": [list(pred[i] / 2)] * 2, "step_relative_gap": [0.01, 0.02]}
                  for i, t in enumerate(rows)}}
    r.update(im.matrix_stats(pred, act))
    if terms is not None:
        r["terms"] = {"chosen": (terms + rng.random(terms.shape)).tolist(), "rejected": (act - terms).tolist()}
    return r


def test_claims_and_report_on_hand_made_matrices():
    cols = ["chosen", "rejected", "chosen_rephrase", "rejected_rephrase", "other_train", "random_sentence", im.ARGMAX]
    sft_rows, dpo_rows = ["chosen", "rejected"], ["rejected", "other_train"]
    layout = {"sft_rows": sft_rows, "dpo_rows": dpo_rows, "columns": cols, "omitted": ["shuffled_chosen"]}
    sft = np.array([[5.0, 1.0, 2.0, 0.5, 1.5, -0.5, 0.3],
                    [1.0, 4.0, 0.5, 2.0, 1.0, -0.2, -0.1]])
    dpo = np.array([[0.3, -5.0, -0.2, -1.0, 0.4, -0.1, -0.2],  # other_train rises, argmax falls
                    [0.2, -0.1, 0.0, -0.1, -0.8, -0.3, 0.1]])
    dpo_pred = dpo.copy()
    dpo_pred[1, 2], dpo_pred[1, 0] = 0.01, -0.01  # two cells of fourteen disagree in sign
    per_seed = {s: {"sft": _per_seed(sft * (1 + 0.1 * s), sft * (1 + 0.1 * s), sft_rows),
                    "dpo": _per_seed(dpo_pred, dpo, dpo_rows, terms=np.full_like(dpo, 0.5))} for s in (0, 1, 2)}
    rows, cells = im.claims(per_seed, [0, 1, 2], layout)
    by = {r.claim: r for r in rows}
    checks = [r for r in rows if r.kind == "check"]
    assert [r.passed for r in checks] == [True, False]  # DPO: 12/14 cells < 90 %
    assert checks[1].value["mean"] == pytest.approx(12 / 14)
    assert by["SFT on chosen: other_train rises (accumulated actual change, nats)"].passed
    assert by["SFT on chosen: random_sentence falls (accumulated actual change, nats)"].passed
    every = next(r for r in rows if "every other probe falls" in r.claim)
    assert not every.passed and set(every.value["rising"]) == {"other_train"}
    assert not by["DPO on rejected: argmax_chosen rises (the squeeze into y*) (accumulated actual change, nats)"].passed
    diag = next(r for r in rows if r.claim.startswith("DPO: each training target"))
    assert diag.value["per_seed"] == [1.0, 1.0, 1.0] and diag.passed
    text = im.report(im.Config(quick=True), im.PipelineConfig(), layout, rows, cells, per_seed, [0, 1, 2], 1.0)
    assert "## Explanation" in text and "DPO rejected → other_train" in text and "y⁻ term" in text
    assert "shuffled_chosen" in text  # the omitted family is named


def test_rows_and_columns():
    fams = ("chosen", "rejected", "other_train")
    sft, dpo, cols = im.rows_and_columns(fams, ("chosen", "rejected", "chosen_rephrase"))
    assert sft == ["chosen", "rejected"] and dpo == ["rejected"] and cols == [*fams, im.ARGMAX]
    assert im.rows_and_columns(fams, ("all",))[0] == list(fams)


# ------------------------------------------------------------------------------ end to end

def _check_run(out):
    rows = read_claims(out / "claims.json")
    assert {r["kind"] for r in rows} == {"check", "paper"}
    for r in rows:
        assert r["experiment"] == "influence_matrix" and len(r["seeds"]) == 3
        assert len(r["value"]["per_seed"]) == 3
        if r["kind"] == "check":
            assert r["passed"], (r["claim"], r["value"])
    assert (out / "influence_matrix.png").stat().st_size > 0
    assert (out / "report.md").read_text().startswith("# Influence matrix")
    return json.loads((out / "results.json").read_text())


@pytest.mark.experiment
def test_quick_world(tmp_path):
    out = tmp_path / "out"
    im.main(im.Config(out=str(out), run_dir=str(tmp_path / "run"), seeds=(0, 1, 2), quick=True,
                      compile_cache=str(tmp_path / "jax_cache")))
    results = _check_run(out)
    layout = results["layout"]
    assert layout["sft_rows"] == list(im.QUICK["targets"]) and "chosen" not in layout["dpo_rows"]
    m = np.asarray(results["mean"]["sft"]["actual"])
    assert m.shape == (len(layout["sft_rows"]), len(layout["columns"]))
    assert m[0, layout["columns"].index("chosen")] > 0  # SFT on chosen raises chosen


def _hh_file(path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    subjects = ["cats", "rivers", "bread", "music", "trains", "gardens", "stars", "boats"]
    words = ["the", "a", "is", "very", "quite", "good", "bad", "slow", "quick", "green", "warm", "old", "new"]
    with open(path, "w") as f:
        for i in range(n):
            prompt = f"\n\nHuman: tell me about {subjects[i % len(subjects)]} number {i}"
            shared = " ".join(rng.choice(words, 4))
            chosen = f"{shared} {' '.join(rng.choice(words, 6))}"
            rejected = f"{shared} {' '.join(rng.choice(words[::-1], 6))} sorry"
            f.write(json.dumps({"chosen": f"{prompt}\n\nAssistant: {chosen}",
                                "rejected": f"{prompt}\n\nAssistant: {rejected}"}) + "\n")
    return str(path)


@pytest.mark.experiment
@pytest.mark.slow
def test_quick_hh_jsonl(tmp_path):
    data = _hh_file(tmp_path / "hh.jsonl")
    out = tmp_path / "out"
    im.main(im.Config(out=str(out), run_dir=str(tmp_path / "run"), seeds=(0, 1, 2), quick=True, data=data,
                      targets=("chosen", "rejected", "chosen_rephrase", "other_train", "random_sentence"),
                      compile_cache=str(tmp_path / "jax_cache")))
    results = _check_run(out)
    layout = results["layout"]
    assert results["pipeline"]["data"] == data
    # an HH file without rephrase fields: that family is left out, named in the report
    assert "chosen_rephrase" in layout["omitted"] and "chosen_rephrase" not in layout["columns"]
    assert layout["sft_rows"] == ["chosen", "rejected", "other_train", "random_sentence"]
    assert "chosen_rephrase" in (out / "report.md").read_text()
