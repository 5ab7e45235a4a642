"""Quick runs of the LM experiments (sft_dynamics, dpo_dynamics) and the pipeline's stage cache.

The world leg runs both experiments in quick mode (3 tiny seeds) into one shared pipeline cache;
the JSONL leg does the same on a small Anthropic-HH file written here (marked slow: another
vocabulary, so everything compiles again). One JAX compilation cache serves every run.
"""
import json

import numpy as np
import pytest

from experiments import dpo_dynamics, lm_pipeline, sft_dynamics
from experiments.claims import read_claims

# End-to-end experiment runs (minutes on 2 cores): `make test-experiments`, not `make test`.
pytestmark = pytest.mark.experiment

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def _check_outputs(out, experiment, figures):
    rows = read_claims(out / "claims.json")
    assert rows and all(r["experiment"] == experiment for r in rows)
    assert {r["kind"] for r in rows} == {"check", "paper"}
    for r in rows:
        assert len(r["seeds"]) >= 3, r["claim"]
        assert "mean" in r["value"] and len(r["value"]["per_seed"]) == len(r["seeds"])
        if r["kind"] == "check":
            assert r["passed"], (r["claim"], r["value"])
    for name in figures:
        assert (out / name).stat().st_size > 0, name
    assert (out / "report.md").read_text().startswith("#")
    return rows, json.loads((out / "results.json").read_text())


def _run_both(tmp_path, compile_cache, **data):
    run_dir = str(tmp_path / "run")
    sft = sft_dynamics.main(sft_dynamics.Config(out=str(tmp_path / "sft"), run_dir=run_dir, seeds=SEEDS, quick=True,
                                                compile_cache=compile_cache, **data))
    rows, results = _check_outputs(tmp_path / "sft", "sft_dynamics", ["sft_curves.png", "sft_decomposition.png"])
    assert results["decompositions"], "no per-step decomposition was logged"
    assert any("other_train" in r["claim"] for r in rows)
    sft_stage_files = sorted((tmp_path / "run").glob("seed*/sft/stage.json"))
    stamps = [f.stat().st_mtime_ns for f in sft_stage_files]
    dpo = dpo_dynamics.main(dpo_dynamics.Config(out=str(tmp_path / "dpo"), run_dir=run_dir, seeds=SEEDS, quick=True,
                                                starts=("sft",), compile_cache=compile_cache, **data))
    rows, results = _check_outputs(tmp_path / "dpo", "dpo_dynamics",
                                   ["dpo_curves_sft_full.png", "dpo_curves_sft_head.png", "dpo_decomposition_terms.png"])
    # DPO reused the SFT stage of sft_dynamics (same cache key), and split the update into terms.
    assert len(sft_stage_files) == len(SEEDS) and [f.stat().st_mtime_ns for f in sft_stage_files] == stamps
    terms = results["terms"]["sft/full"]["chosen"]
    assert {"chosen/head", "chosen/body", "rejected/head", "rejected/body"} <= set(terms)
    # Head-only training: the body parts of its update are exactly zero.
    head = results["terms"]["sft/head"]["chosen"]
    assert head["chosen/body"] == [0.0, 0.0] and head["rejected/body"] == [0.0, 0.0]
    assert set(results["token_squeeze"]["sft/full"]) >= {"share_to_argmax", "argmax_rises", "chosen_token_dlogp"}
    return sft, dpo


def test_quick_world(tmp_path, compile_cache):
    _run_both(tmp_path, compile_cache)


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


@pytest.mark.slow
def test_quick_hh_jsonl(tmp_path, compile_cache):
    data = _hh_file(tmp_path / "hh.jsonl")
    sft, dpo = _run_both(tmp_path, compile_cache, data=data)
    assert sft["pipeline"]["data"] == data and dpo["pipeline"]["data"] == data


def test_pipeline_cache(tmp_path, compile_cache):
    lm_pipeline.enable_compile_cache(compile_cache)
    config = lm_pipeline.PipelineConfig.quick_preset(run_dir=str(tmp_path / "run"), pretrain_steps=4, sft_steps=2,
                                                     track_every=1)
    first = lm_pipeline.Pipeline(config).base(0)
    assert not first.reused
    again = lm_pipeline.Pipeline(config).base(0)
    assert again.reused and again.key == first.key
    sft = lm_pipeline.Pipeline(config).sft(0, again)
    # Another pretraining config rebuilds the base model, and the SFT on top of it.
    changed = lm_pipeline.dataclasses.replace(config, pretrain_steps=5)
    rebuilt = lm_pipeline.Pipeline(changed).base(0)
    assert not rebuilt.reused and rebuilt.key != first.key
    assert json.loads((rebuilt.out / "summary.json").read_text())["steps"] == 5
    sft_again = lm_pipeline.Pipeline(changed).sft(0, rebuilt)
    assert not sft_again.reused and sft_again.key != sft.key
    # A local model directory is used as the base as is: no pretraining.
    given = lm_pipeline.Pipeline(lm_pipeline.dataclasses.replace(config, model=rebuilt.model_dir)).base(0)
    assert given.model_dir == rebuilt.model_dir and given.seconds == 0.0
