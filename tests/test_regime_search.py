"""experiments.regime_search: the regime list, the rejected-style knob reaching the world, the table
and claims from hand-made outcomes, and (marked ``experiment``) a quick end-to-end run."""
import json

import pytest

from experiments import regime_search
from experiments.claims import read_claims
from ldjax import cli
from ldjax.train.config import DPOConfig


def test_config_validates_regimes():
    with pytest.raises(ValueError, match="unknown"):
        regime_search.Config(regimes=("no_such_regime",))
    assert set(regime_search.Config().regimes) == set(regime_search.BY_NAME)


def test_each_regime_changes_something_real():
    fields = set(regime_search.PipelineConfig.__dataclass_fields__)
    dpo_fields = set(DPOConfig.__dataclass_fields__)
    for r in regime_search.REGIMES:
        assert set(r.pipeline) <= fields, r.name
        assert set(r.dpo) <= dpo_fields, r.name
        assert r.start in ("sft", "base")
    names = [r.name for r in regime_search.REGIMES if r.name != "reference"]
    changes = [(tuple(sorted(r.pipeline.items())), tuple(sorted(r.dpo.items())), r.start, r.head_only, r.lr_scale,
                r.steps_scale) for r in regime_search.REGIMES if r.name != "reference"]
    assert all(c != ((), (), "sft", False, 1.0, 1) for c in changes), names  # no row repeats the reference
    assert len(set(changes)) == len(changes)


def test_rejected_style_reaches_the_world():
    small = dict(world_entities=8, world_train=10, world_test=4, world_pretrain=20, track_prompts=4)
    rare = cli._world(DPOConfig(**small))
    foreign = cli._world(DPOConfig(**small, world_rejected_style="foreign"))
    assert [p.rejected for p in rare.train] != [p.rejected for p in foreign.train]
    with pytest.raises(ValueError, match="rejected.style"):
        cli._world(DPOConfig(**small, world_rejected_style="nope"))


def _outcome(d_chosen, d_star, **terms):
    return {"d_chosen": d_chosen, "chosen_early_rise": 0.0, "d_rejected": -5.0, "d_argmax_chosen": d_star,
            "d_argmax_rejected": 0.0, "d_a_norm": 0.0, "loss_start": 0.693, "loss_end": 0.5,
            "squeezes": d_star > regime_search.TOL and d_chosen < -regime_search.TOL,
            "terms": {k.replace("_", "/"): v for k, v in terms.items()}}


def test_table_and_claims_from_outcomes():
    config = regime_search.Config(regimes=("reference", "head_only", "wide_d128"), seeds=(0, 1))
    results = {"reference": [_outcome(-1.0, 0.5, rejected_body=[-0.3, 0.1]), _outcome(-1.0, -0.5)],
               "head_only": [_outcome(-0.2, 0.6), _outcome(-0.2, 0.7)],
               "wide_d128": [_outcome(-2.0, 1.0, rejected_body=[-0.4, 0.2])] * 2}
    rows = regime_search.claims(results, [0, 1])
    by_claim = {r.claim: r for r in rows}
    exists = rows[0]
    assert exists.passed and exists.value["squeezing"] == ["wide_d128"]
    assert not next(r for c, r in by_claim.items() if "regime reference" in c).passed
    assert next(r for c, r in by_claim.items() if "head-only" in c).passed
    table = "\n".join(regime_search.table(config, results))
    assert "**1/2**" in table and "**2/2**" in table
    assert "python -m experiments.regime_search --regimes wide_d128 --seeds 0,1" in table


@pytest.mark.experiment  # an end-to-end run (about a minute): make test-experiments
def test_quick(tmp_path):
    out = tmp_path / "out"
    regime_search.main(regime_search.Config(out=str(out), run_dir=str(tmp_path / "run"), quick=True,
                                            compile_cache=str(tmp_path / "jax_cache")))
    rows = read_claims(out / "claims.json")
    assert rows and all(r["experiment"] == "regime_search" and r["kind"] == "paper" for r in rows)
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == set(regime_search.QUICK_REGIMES)
    head = saved["results"]["head_only"][0]["terms"]
    assert head["rejected/body"] == [0.0, 0.0] and head["chosen/body"] == [0.0, 0.0]
    assert "| `tied_qwen2` |" in (out / "table.md").read_text()
