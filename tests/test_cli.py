"""The ldjax CLI: pretrain -> sft -> dpo chained through saved model directories, --data, --config."""
from __future__ import annotations

import json

import pytest

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from ldjax import cli
from ldjax.config import parse_config
from ldjax.data.preference import SFTExample
from ldjax.data.tokenize import TokenizationError, tokenize_sft
from ldjax.train.checkpoint import CheckpointConfigMismatch, CheckpointError
from ldjax.train.config import ConfigError, DPOConfig, SFTConfig

TINY = ["--d-model", "16", "--num-layers", "1", "--num-heads", "2", "--max-length", "48", "--max-prompt-length", "20",
        "--world-entities", "8", "--world-train", "8", "--world-test", "4", "--world-pretrain", "16",
        "--batch-size", "4", "--progress", "false", "--num-devices", "1"]


def read_metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~20-40 s on 2 shared cores: three compiles; the pieces are tested fast in test_train.py
def test_pretrain_sft_dpo_chain(tmp_path):
    assert cli.main(["pretrain", *TINY, "--num-steps", "2", "--out", str(tmp_path / "base")]) == 0
    assert (tmp_path / "base" / "model" / "model.safetensors").exists()
    assert cli.main(["sft", *TINY, "--model", str(tmp_path / "base" / "model"), "--num-steps", "2",
                     "--sft-on-both", "true", "--out", str(tmp_path / "sft")]) == 0
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["num_train_examples"] == 16  # chosen and rejected of 8 pairs
    config_file = tmp_path / "dpo.json"
    config_file.write_text(json.dumps({"loss_type": "ipo", "beta": 0.2, "num_steps": 2, "optimizer": "rmsprop",
                                       "learning_rate": 1e-4, "warmup_steps": 1, "clip_norm": 10.0}))
    assert cli.main(["dpo", *TINY, "--config", str(config_file), "--model", str(tmp_path / "sft" / "model"),
                     "--out", str(tmp_path / "dpo")]) == 0
    lines = read_metrics(tmp_path / "dpo")
    assert [l["step"] for l in lines] == [1, 2]
    first = lines[0]
    # Policy == reference at step 1 (reference log-probs precomputed from the same model).
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    assert first["loss"] == pytest.approx((1 / (2 * 0.2)) ** 2, rel=1e-4)  # IPO at zero margin
    assert first["lr"] == pytest.approx(1e-4 / 2, rel=1e-5)  # warm-up step 0 of 1
    saved = json.loads((tmp_path / "dpo" / "config.json").read_text())
    assert (saved["loss_type"], saved["beta"], saved["command"]) == ("ipo", 0.2, "dpo")


@pytest.mark.slow  # one compile of a step that samples 3 candidates x 8 tokens (KV cache) and ranks them
def test_on_policy_dpo_samples_both_sides_inside_the_step(tmp_path):
    # best of 3 by the world's judge as y⁺, worst as y⁻ (the ranking itself: tests/test_train.py)
    assert cli.main(["dpo", *TINY, "--on-policy", "both", "--on-policy-candidates", "3", "--on-policy-judge", "world",
                     "--max-new-tokens", "8", "--num-steps", "2", "--out", str(tmp_path / "op")]) == 0
    lines = read_metrics(tmp_path / "op")
    assert [l["step"] for l in lines] == [1, 2]
    # The reference log-probs of the sampled responses are recomputed in the step, so at step 1
    # (policy = reference) both rewards are zero.
    assert all(np.isfinite(l["loss"]) and np.isfinite(l["logps/rejected"]) for l in lines)
    assert abs(lines[0]["rewards/chosen"]) < 1e-4 and abs(lines[0]["rewards/rejected"]) < 1e-4


def test_judge_ranked_on_policy_flags_are_checked(tmp_path):
    cases = [(["--on-policy-candidates", "3"], "--on-policy is off"),
             (["--on-policy", "rejected", "--on-policy-candidates", "3"], "needs a judge"),
             (["--on-policy", "rejected", "--on-policy-judge", "world", "--data", str(tmp_path / "x.jsonl")],
              "embedded world's styles")]
    (tmp_path / "x.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    for flags, message in cases:
        with pytest.raises(ConfigError, match=message):
            cli.main(["dpo", *TINY, *flags, "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    with pytest.raises(ConfigError, match="on_policy_judge"):
        parse_config(DPOConfig, ["--on-policy-judge", "gpt4"])


@pytest.mark.slow  # three compiles of a 3-step SFT
def test_remat_and_bf16_compute(tmp_path):
    """--remat gives the same trajectory (recomputing a block is the same arithmetic); --compute-dtype
    bfloat16 runs the layers in bf16 on float32 master weights: close to float32, not equal."""
    from safetensors.numpy import load_file
    args = ["sft", *TINY, "--num-steps", "3", "--optimizer", "sgd", "--learning-rate", "0.05"]
    runs = {}
    for name, extra in (("f32", []), ("remat", ["--remat", "true"]), ("bf16", ["--compute-dtype", "bfloat16"])):
        assert cli.main([*args, *extra, "--out", str(tmp_path / name)]) == 0
        runs[name] = [l["loss"] for l in read_metrics(tmp_path / name)]
    np.testing.assert_allclose(runs["remat"], runs["f32"], rtol=1e-6)
    np.testing.assert_allclose(runs["bf16"], runs["f32"], rtol=3e-2)
    assert runs["bf16"] != runs["f32"]  # the bf16 forward really ran
    weights = load_file(str(tmp_path / "bf16" / "model" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {np.dtype("float32")}  # master weights stay float32
    with pytest.raises(ConfigError, match="compute_dtype"):
        parse_config(SFTConfig, ["--compute-dtype", "float16"])


def test_data_flag_reads_jsonl_and_reports_bad_lines(tmp_path):
    rows = [{"prompt": f"question {i} about cats ?", "chosen": f"a good answer number {i} .", "rejected": f"bad {i}"}
            for i in range(10)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["sft", *TINY, "--data", str(data), "--num-steps", "2", "--out", str(tmp_path / "run")]
    assert cli.main(args) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["num_train_examples"] == 9  # 10 % held out
    data.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="pairs.jsonl.*2"):
        cli.main(args[:-1] + [str(tmp_path / "run2")])


def test_unknown_command_and_bad_flag(capsys):
    assert cli.main([]) == 2
    assert cli.main(["finetune"]) == 2
    assert cli.main(["--help"]) == 0
    assert "usage: ldjax {pretrain,sft,dpo}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["dpo", "--beta", "abc"])
    with pytest.raises(ValueError, match="on_policy"):
        parse_config(DPOConfig, ["--on-policy", "sometimes"])


def word_tokenizer(tokens):
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


@pytest.mark.parametrize("tokens, expected", [
    (["<unk>", "</s>", "[PAD]", "a", "b"], {"bos_id": None, "eos_id": 1, "pad_id": 2}),    # BERT-style pad
    (["<|endoftext|>", "a", "b"], {"bos_id": 0, "eos_id": 0, "pad_id": 0}),                # Pythia: pad = EOS
    (["a", "<|im_end|>", "b", "<s>"], {"bos_id": 3, "eos_id": 1, "pad_id": 1}),            # no pad: EOS, never 0
])
def test_special_ids_are_the_ones_tokenisation_uses(tokens, expected):
    tokenizer = word_tokenizer(tokens)
    ids = cli.special_ids(tokenizer)
    assert ids == expected
    # tokenize_sft left to its own defaults pads with (and appends) the very same ids.
    arrays = tokenize_sft([SFTExample("a", "b"), SFTExample("a b a", "b")], tokenizer, max_length=8,
                          max_prompt_length=4, pad_to_max_length=True)
    short = arrays["input_ids"][0]
    assert short[2] == ids["eos_id"] and (short[3:] == ids["pad_id"]).all()
    assert cli._token_kwargs(DPOConfig(), tokenizer, vocab_size=len(tokens))["vocab_size"] == len(tokens)


def test_special_ids_without_eos_is_a_clear_error():
    with pytest.raises(TokenizationError, match="pass eos_id explicitly"):
        cli.special_ids(word_tokenizer(["a", "b", "<pad>"]))


def test_lengths_beyond_the_model_positions_are_refused_before_training(tmp_path):
    # The tiny model has max_position_embeddings=2048; every batch is padded to max_length.
    out = tmp_path / "long"
    with pytest.raises(ConfigError, match="max_length=3000 exceeds the model's max_position_embeddings=2048"):
        cli.main(["sft", *TINY, "--max-length", "3000", "--out", str(out)])
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    # On-policy samples append max_new_tokens to the padded prompt+response length.
    with pytest.raises(ConfigError, match=r"max_length=2040 \+ max_new_tokens=24 \(on-policy samples\) = 2064 exceeds"):
        cli.main(["dpo", *TINY, "--max-length", "2040", "--on-policy", "rejected", "--max-new-tokens", "24",
                  "--out", str(out)])
    # Off-policy, the same max_length fits.
    cli.check_lengths(DPOConfig(max_length=2040, on_policy="off"), type("C", (), {"max_position_embeddings": 2048}))


def test_relaunch_with_other_settings_is_refused_and_allowed_changes_resume(tmp_path):
    rows = [{"prompt": f"question {i} about dogs ?", "chosen": f"answer {i} is kind .", "rejected": f"no {i}"}
            for i in range(10)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    base = ["sft", *TINY, "--data", str(data), "--num-steps", "2", "--out", str(out)]
    assert cli.main(base) == 0
    saved_config = (out / "config.json").read_text()

    refused = [
        (["--seed", "5"], ["seed: checkpoint 0 vs now 5"]),
        (["--batch-size", "2", "--learning-rate", "0.001"], ["batch_size: checkpoint 4 vs now 2",
                                                            "learning_rate: checkpoint 0.0001 vs now 0.001"]),
        (["--max-length", "40"], ["max_length: checkpoint 48 vs now 40"]),
        (["--accumulation-steps", "2"], ["accumulation_steps: checkpoint 1 vs now 2"]),
        (["--sft-on-both", "true"], ["sft_on_both: checkpoint False vs now True"]),
    ]
    for extra, diffs in refused:
        with pytest.raises(CheckpointConfigMismatch) as err:
            cli.main(base + extra)
        assert all(d in str(err.value) for d in diffs), (extra, str(err.value))
    # Same path, other contents: another data order, so refused too.
    data.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    with pytest.raises(CheckpointConfigMismatch, match="data_sha256"):
        cli.main(base)
    assert (out / "config.json").read_text() == saved_config  # nothing was overwritten by a refused launch
    assert [l["step"] for l in read_metrics(out)] == [1, 2]

    # Back to the original data; more steps, another mesh size and log frequency may change.
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(base[:-4] + ["--num-steps", "3", "--num-devices", "2", "--log-every", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["resumed_from"], summary["steps"], summary["devices"]) == (2, 3, 2)
    assert json.loads((out / "config.json").read_text())["num_steps"] == 3
    assert [l["step"] for l in read_metrics(out)] == [1, 2, 3]


def test_fresh_start_next_to_old_checkpoints_is_refused(tmp_path):
    out = tmp_path / "run"
    base = ["sft", *TINY, "--num-steps", "2", "--checkpoint-every", "1", "--out", str(out)]
    assert cli.main(base) == 0
    saved_config = (out / "config.json").read_text()
    with pytest.raises(CheckpointError, match="already holds checkpoints .*--resume is false"):
        cli.main(base + ["--resume", "false"])
    assert (out / "config.json").read_text() == saved_config


def read_tracking(run_dir):
    return [json.loads(l) for l in (run_dir / "tracking.jsonl").read_text().splitlines()]


@pytest.mark.slow  # four CLI runs (~25 s on 2 shared cores); the loop-level twins in test_tracking.py are fast
def test_track_every_writes_probe_logs_without_changing_the_run_and_resumes(tmp_path):
    base = ["sft", *TINY, "--num-steps", "2"]
    assert cli.main(base + ["--out", str(tmp_path / "plain")]) == 0
    out = tmp_path / "tracked"
    assert cli.main(base + ["--track-every", "1", "--track-prompts", "4", "--checkpoint-every", "1",
                            "--out", str(out)]) == 0
    # Tracking reads the parameters only: the same metrics and the same saved model, bitwise.
    strip = lambda lines: [{k: v for k, v in l.items() if k != "tokens_per_s"} for l in lines]  # noqa: E731
    assert strip(read_metrics(out)) == strip(read_metrics(tmp_path / "plain"))
    assert (out / "model" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model" / "model.safetensors").read_bytes()
    records = read_tracking(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    probes = json.loads((out / "probes.json").read_text())
    assert probes["origin"] == "world" and len(probes["prompts"]) == 4 and len(probes["families"]) == 11
    assert set(records[0]["logps"]) == set(probes["families"]) | {"argmax_chosen", "argmax_rejected"}
    summary = json.loads((out / "summary.json").read_text())["tracking"]
    assert summary["num_prompts"] == 4 and summary["omitted"] == {} and summary["track_s"] > 0

    # Resume: more steps and another tracking frequency are allowed, the log continues...
    assert cli.main(base[:-1] + ["3", "--track-every", "3", "--track-prompts", "4", "--out", str(out)]) == 0
    assert [r["step"] for r in read_tracking(out)] == [0, 1, 2, 3]
    # ...but not with another probe set, refused before anything is written.
    saved_config = (out / "config.json").read_text()
    from ldjax.tracking import TrackingMismatch
    with pytest.raises(TrackingMismatch, match="holds 4 records"):
        cli.main(base[:-1] + ["4", "--track-every", "1", "--track-prompts", "3", "--out", str(out)])
    assert (out / "config.json").read_text() == saved_config


def test_dpo_tracking_on_an_hh_file_with_rephrase_fields(tmp_path):
    rows = []
    for i in range(12):
        prompt = f"\n\nHuman: what about cats {i} ?\n\nAssistant:"
        rows.append({"chosen": f"{prompt} cats {i} purr softly .", "rejected": f"{prompt} dogs {i} bark .",
                     "chosen_rephrase": f"felines {i} purr gently .", "rejected_rephrase": f"hounds {i} bark ."})
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dpo"
    assert cli.main(["dpo", *TINY, "--data", str(data), "--num-steps", "2", "--track-every", "2",
                     "--learning-rate", "0.01", "--out", str(out)]) == 0
    records = read_tracking(out)
    assert [r["step"] for r in records] == [0, 2]
    summary = json.loads((out / "summary.json").read_text())["tracking"]
    assert summary["num_prompts"] == 11 and set(summary["omitted"]) == {"chosen_format", "rejected_format"}
    assert "chosen_rephrase" in records[0]["logps"] and "other_test" in records[0]["logps"]
    first, last = records[0]["dpo"], records[1]["dpo"]
    assert first["margin"]["min"] == first["margin"]["max"] == 0  # the reference is the starting policy
    assert first["coef_chosen"]["mean"] == pytest.approx(0.05)  # beta (1 - 1/2), beta = 0.1
    assert last["margin"]["mean"] != 0
