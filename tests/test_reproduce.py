"""The main job (experiments.reproduce): flags, per-experiment configs, the report and the exit status,
and (marked ``experiment``) quick end-to-end runs on the embedded world and on an HH file written here."""
import json
import pathlib

import pytest

from experiments import reproduce
from experiments.claims import Claim, write_claims

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "results"


def test_flags_are_validated(tmp_path):
    with pytest.raises(ValueError, match="--only: unknown"):
        reproduce.Config(only=("nope",))
    with pytest.raises(ValueError, match="--seeds"):
        reproduce.Config(seeds=0)
    with pytest.raises(ValueError, match="--data: no such file"):
        reproduce.Config(data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="--model"):
        reproduce.Config(model=str(tmp_path))


def test_selection_all_smoke_and_only():
    assert reproduce.selected(reproduce.Config()) == list(reproduce.EXPERIMENTS)
    assert reproduce.selected(reproduce.Config(quick=True)) == list(reproduce.SMOKE)  # the one-minute smoke run
    assert reproduce.selected(reproduce.Config(quick=True, only=("all",))) == list(reproduce.EXPERIMENTS)
    # --only keeps the main job's order, whatever the order given
    assert reproduce.selected(reproduce.Config(only=("token_squeeze", "first_order"))) == ["first_order", "token_squeeze"]
    assert set(reproduce.SMOKE) <= set(reproduce.EXPERIMENTS)
    # the smoke run trims dpo_dynamics further; --quick --only ... keeps each experiment's quick mode
    assert reproduce.experiment_config("dpo_dynamics", reproduce.Config(quick=True)).trainable == ("full",)
    assert reproduce.experiment_config("dpo_dynamics", reproduce.Config(quick=True, only=("all",))).trainable == ("full", "head")


def test_bad_flags_end_in_one_line_with_status_2(tmp_path):
    import subprocess
    import sys
    for args, named in ((["--only", "nope"], "--only"), (["--data", str(tmp_path / "x.jsonl")], "--data"),
                        (["--seeds", "abc"], "--seeds")):
        proc = subprocess.run([sys.executable, "-m", "ldjax", "reproduce", *args, "--out", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and named in lines[0], (args, proc.stderr)
        assert lines[0].startswith("ldjax reproduce: error:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_experiment_configs_share_the_pipeline_and_pass_sources_only_to_llm_experiments(tmp_path):
    data = tmp_path / "hh.jsonl"
    data.write_text("{}\n")
    config = reproduce.Config(out=str(tmp_path / "out"), seeds=4, data=str(data))
    shared = []
    for name in reproduce.EXPERIMENTS:
        if reproduce.skipped_reason(name, config):
            assert name in ("kernel_balance", "token_squeeze")
            continue
        c = reproduce.experiment_config(name, config)
        assert c.out == str(tmp_path / "out" / name)
        if name in reproduce.LLM:
            assert c.data == str(data)
            if hasattr(c, "run_dir") and name not in ("kernel_balance",):
                shared.append(c.run_dir)
        else:
            assert getattr(c, "data", "") != str(data)
    assert set(shared) == {str(tmp_path / "out" / "runs")}  # one pipeline cache: one base model
    sft = reproduce.experiment_config("sft_dynamics", config)
    assert sft.seeds == (0, 1, 2, 3)
    quick = reproduce.experiment_config("dpo_dynamics", reproduce.Config(quick=True))
    assert quick.quick and quick.seeds == (0,)
    assert reproduce.skipped_reason("kernel_balance", config) and not reproduce.skipped_reason("sft_dynamics", config)


def test_every_committed_figure_has_a_caption():
    """REPORT.md embeds every figure with two lines saying what it shows: none may fall back."""
    missing = [f"{png.parent.name}/{png.name}" for name in reproduce.EXPERIMENTS
               for png in sorted((RESULTS / name).glob("*.png"))
               if f"{png.parent.name}/{png.name}" not in reproduce.CAPTIONS]
    assert not missing


def _fake_experiment(out, name, rows, figures=("a.png",), explanation=""):
    d = out / name
    d.mkdir(parents=True)
    for f in figures:
        (d / f).write_bytes(b"\x89PNG")
    write_claims(d, rows)
    (d / "report.md").write_text(f"# {name}\n\n## Claims\n\nrows\n\n## Explanation\n\n{explanation}\n")


def test_report_claims_and_exit_status(tmp_path):
    out = tmp_path / "out"
    good = Claim("sft_dynamics", "chosen rises", "paper", False, {"mean": 1.0, "std": 0.5, "per_seed": [1, 1.5, 0.5]},
                 (0, 1, 2))
    check = Claim("sft_dynamics", "explicit = implicit", "check", True, {"mean": 1e-15, "std": 0.0}, (0, 1, 2))
    _fake_experiment(out, "sft_dynamics", [good, check], explanation="rejected was pushed by the body term (-0.3/step)")
    bad = Claim("first_order", "ratio in [3, 5]", "check", False, {"mean": 2.0, "std": 0.0}, (0,))
    _fake_experiment(out, "first_order", [bad], figures=("gap_vs_lr.png",))
    config = reproduce.Config(out=str(out), only=("first_order", "sft_dynamics"), quick=True)
    summary = {"first_order": {"status": "ok", "seconds": 1.0}, "sft_dynamics": {"status": "ok", "seconds": 2.0}}
    rows = reproduce.collect_claims(out, ["first_order", "sft_dynamics"])
    assert [r["claim"] for r in rows] == ["ratio in [3, 5]", "chosen rises", "explicit = implicit"]
    report = reproduce.write_report(config, summary, rows, reproduce.environment(), 3.0).read_text()
    assert "QUICK SMOKE RUN" in report and "not results" in report
    assert "**1/2 pass**" in report and "FAILED: ratio in [3, 5]" in report
    assert "![first_order/gap_vs_lr.png](first_order/gap_vs_lr.png)" in report
    assert reproduce.CAPTIONS["first_order/gap_vs_lr.png"] in report
    assert "rejected was pushed by the body term" in report  # a failing paper claim brings its explanation
    assert "| **FAIL** | check | first_order | ratio in [3, 5] | 2 ± 0 | 1 |" in report
    assert reproduce.exit_status({"failed_checks": ["x"], "crashed": []}) == 1
    assert reproduce.exit_status({"failed_checks": [], "crashed": ["y"]}) == 1
    assert reproduce.exit_status({"failed_checks": [], "crashed": []}) == 0


def test_a_crashing_experiment_is_reported_and_the_others_run(tmp_path, monkeypatch):
    def boom(config):
        raise RuntimeError("boom")
    import experiments.first_order as first_order
    monkeypatch.setattr(first_order, "main", boom)
    result = reproduce.main(reproduce.Config(out=str(tmp_path), only=("first_order",)))
    assert result["crashed"] == ["first_order"] and reproduce.exit_status(result) == 1
    assert "RuntimeError: boom" in (tmp_path / "REPORT.md").read_text()
    assert json.loads((tmp_path / "claims.json").read_text()) == []


def _hh_file(path, n=40):
    """An Anthropic-HH-format file (not shipped): 40 pairs about colours and numbers."""
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
    with path.open("w") as f:
        for i in range(n):
            c = colours[i % len(colours)]
            prompt = f"\n\nHuman: what can you tell me about the colour {c} and the number {i}?"
            chosen = f"{prompt}\n\nAssistant: the colour {c} is calm and the number {i} is even or odd as it is ."
            rejected = f"{prompt}\n\nAssistant: no idea , go away {i} {i} {i} ."
            f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    return path


@pytest.mark.experiment  # an end-to-end run (minutes): make test-experiments
def test_quick_reproduce_on_an_hh_file(tmp_path):
    data = _hh_file(tmp_path / "hh.jsonl")
    result = reproduce.main(reproduce.Config(out=str(tmp_path / "out"), quick=True, data=str(data),
                                             only=reproduce.LLM))
    assert not result["crashed"], result["experiments"]
    skipped = {n for n, s in result["experiments"].items() if s["status"] == "skipped"}
    assert skipped == {"kernel_balance", "token_squeeze"}  # tiny-model sweeps; token_squeeze needs --model
    rows = json.loads((tmp_path / "out" / "claims.json").read_text())
    assert {r["experiment"] for r in rows} == set(reproduce.LLM) - skipped
    assert all(r["passed"] for r in rows if r["kind"] == "check")
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert str(data) in report and "sft_dynamics/sft_curves.png" in report
