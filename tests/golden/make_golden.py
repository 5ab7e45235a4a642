"""Makes the Hugging Face golden fixtures of ``tests/test_hf_parity.py`` (needs torch + transformers).

Run with the test-only torch environment, never from ldjax itself::

    /tmp/venv-torch/bin/python tests/golden/make_golden.py make tests/golden
    /tmp/venv-torch/bin/python tests/golden/make_golden.py logits INPUTS.npz DIR [DIR ...]
    /tmp/venv-torch/bin/python tests/golden/make_golden.py live OUT INPUTS.npz DIR [DIR ...]  # both

``make OUT`` writes one directory per fixture in :data:`FIXTURES` (tiny random-weight
``GPTNeoXForCausalLM`` / ``Qwen2ForCausalLM`` saved with ``save_pretrained`` as safetensors,
a WordLevel ``tokenizer.json``, and ``expected_logits.npz`` holding ``input_ids``,
``attention_mask`` (one right-padded row), ``logits`` with that mask and ``logits_nomask``).
``logits INPUTS.npz DIR...`` loads checkpoint directories with transformers (eager attention,
float32) and writes ``DIR/transformers_logits.npz``, the logits on the ``input_ids`` /
``attention_mask`` of ``INPUTS.npz``: the live parity test uses it for checkpoints ldjax saved.
"""
from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

VOCAB_SIZE = 160
SEQ_LEN = 11

# name -> (model_type, config kwargs). Small on purpose: each fixture stays well under 1 MB.
FIXTURES: dict[str, tuple[str, dict]] = {
    "gpt_neox_parallel": ("gpt_neox", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, hidden_act="gelu",
        layer_norm_eps=1e-5, tie_word_embeddings=False)),
    "gpt_neox_sequential": ("gpt_neox", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        rotary_pct=0.5, rotary_emb_base=5000, use_parallel_residual=False, hidden_act="gelu",
        layer_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen2_tied": ("qwen2", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "qwen2_untied": ("qwen2", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)),
}


def make_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A WordLevel tokenizer over ``<pad> <unk> <eos> w3 ... w{V-1}``, whitespace pre-tokenised."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def make_inputs(vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """Three rows of random ids; row 1 right-padded by 4, row 2 by 1 (padding id 0)."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(3, vocab_size, size=(3, SEQ_LEN)).astype(np.int64)
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, -4:] = 0
    attention_mask[2, -1:] = 0
    input_ids[attention_mask == 0] = 0
    return dict(input_ids=input_ids, attention_mask=attention_mask)


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {"input_ids": torch.from_numpy(np.asarray(input_ids, np.int64))}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.from_numpy(np.asarray(attention_mask, np.int64))
        return model(**kwargs).logits.float().numpy()


def randomise_(model, seed: int) -> None:
    """Weights large enough that logits are O(1) (HF's 0.02 init makes any parity check trivial);
    norm scales around 1 and non-zero biases so every parameter matters."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "embed" in name or "lm_head" in name:
                p.copy_(0.15 * noise)
            else:
                p.copy_(0.5 / np.sqrt(p.shape[-1]) * noise if p.ndim == 2 else 0.1 * noise)


def build_model(model_type: str, kwargs: dict, vocab_size: int, seed: int):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, max_position_embeddings=64, bos_token_id=2, eos_token_id=2,
                  pad_token_id=0, attn_implementation="eager")
    if model_type == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common, **kwargs))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, **kwargs))
    randomise_(model, seed)
    return model.float().eval()


def make(out: pathlib.Path, seed: int, names: list[str] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names or list(FIXTURES)):
        model_type, kwargs = FIXTURES[name]
        model = build_model(model_type, kwargs, VOCAB_SIZE, seed + i)
        target = out / name
        model.save_pretrained(target)
        (target / "generation_config.json").unlink(missing_ok=True)  # sampling defaults, read by neither side
        make_tokenizer().save(str(target / "tokenizer.json"))
        inputs = make_inputs(VOCAB_SIZE, seed + i)
        np.savez(target / "expected_logits.npz", **inputs,
                 logits=hf_logits(model, inputs["input_ids"], inputs["attention_mask"]),
                 logits_nomask=hf_logits(model, inputs["input_ids"], None))
        print(f"{target}: {sum(p.stat().st_size for p in target.iterdir())} bytes")


def logits_of(inputs_path: pathlib.Path, directories: list[pathlib.Path]) -> None:
    """Writes ``DIR/transformers_logits.npz`` for each checkpoint directory (one torch start for all)."""
    import torch
    from transformers import AutoModelForCausalLM

    inputs = np.load(inputs_path)
    for directory in directories:
        model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32)
        model.eval()
        np.savez(directory / "transformers_logits.npz",
                 logits=hf_logits(model, inputs["input_ids"], inputs["attention_mask"]),
                 model_class=type(model).__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_make = sub.add_parser("make", help="write the golden fixture directories")
    p_make.add_argument("out", type=pathlib.Path)
    p_make.add_argument("--seed", type=int, default=0)
    p_make.add_argument("--names", nargs="*", default=None, choices=list(FIXTURES))
    p_logits = sub.add_parser("logits", help="transformers logits of checkpoint directories")
    p_logits.add_argument("inputs", type=pathlib.Path, help="npz with input_ids and attention_mask")
    p_logits.add_argument("directories", type=pathlib.Path, nargs="+")
    p_live = sub.add_parser("live", help="make OUT then logits INPUTS DIR... in one process (one torch start)")
    p_live.add_argument("out", type=pathlib.Path)
    p_live.add_argument("--seed", type=int, default=0)
    p_live.add_argument("inputs", type=pathlib.Path)
    p_live.add_argument("directories", type=pathlib.Path, nargs="*")
    args = parser.parse_args()
    if args.command in ("make", "live"):
        make(args.out, args.seed, getattr(args, "names", None))
    if args.command in ("logits", "live") and args.directories:
        logits_of(args.inputs, args.directories)


if __name__ == "__main__":
    main()
