"""ldjax.generation.generate: deterministic given the seed, greedy = plain argmax decoding
without a KV cache, stops at EOS, batches of any size."""
from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from ldjax.data import world as W
from ldjax.generation import generate
from ldjax.models import CausalLM, TransformerConfig

PROMPTS = [
    "question : tell me about the history of zuba . answer :",
    "question : describe the habits of kolin . answer :",
    "answer :",
    "question : what do you know of the travels of zuba ? answer :",
    "describe the belongings",
]


@pytest.fixture(scope="module")
def lm():
    tokenizer = W.build_tokenizer(["zuba", "kolin"])
    config = TransformerConfig.tiny("gpt_neox", vocab_size=tokenizer.get_vocab_size(), hidden_size=32,
                                    intermediate_size=64, initializer_range=0.2, max_position_embeddings=64)
    return CausalLM(config, rngs=nnx.Rngs(0)), tokenizer


@nnx.jit
def forward(model, ids):
    return model(ids)


def greedy_by_hand(model, tokenizer, prompt, max_new_tokens, eos_id):
    """Argmax decoding, rerunning the whole (zero-padded, fixed-width) sequence for every token."""
    seq = [tokenizer.token_to_id("<bos>")] + tokenizer.encode(prompt, add_special_tokens=False).ids
    new = []
    for _ in range(max_new_tokens):
        padded = jnp.asarray([seq + [0] * (48 - len(seq))], jnp.int32)
        token = int(jnp.argmax(forward(model, padded)[0, len(seq) - 1]))
        if token == eos_id:
            break
        seq.append(token)
        new.append(token)
    return new


def test_greedy_generation_is_argmax_decoding_without_cache(lm):
    model, tokenizer = lm
    eos = tokenizer.token_to_id("<eos>")
    by_hand = [greedy_by_hand(model, tokenizer, p, 8, eos) for p in PROMPTS]
    expected = [tokenizer.decode(t, skip_special_tokens=True) for t in by_hand]
    print("greedy lengths (< 8: stopped at <eos>):", [len(t) for t in by_hand])
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=8, top_k=1, seed=0, batch_size=2) == expected
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=0.0, seed=5, batch_size=2) == expected
    # Stopping: make the third greedy token of a prompt the EOS; generation stops before it.
    i = next(i for i, t in enumerate(by_hand) if len(t) >= 3)
    stop = by_hand[i][2]
    cut = [greedy_by_hand(model, tokenizer, p, 8, stop) for p in PROMPTS]
    assert cut[i] == by_hand[i][:by_hand[i].index(stop)]
    out = generate(model, tokenizer, PROMPTS, max_new_tokens=8, top_k=1, eos_id=stop, batch_size=2)
    assert out == [tokenizer.decode(t, skip_special_tokens=True) for t in cut]


def test_sampling_is_deterministic_given_the_seed(lm):
    model, tokenizer = lm
    kw = dict(max_new_tokens=8, temperature=1.0, batch_size=2)
    first = generate(model, tokenizer, PROMPTS, seed=3, **kw)
    assert generate(model, tokenizer, PROMPTS, seed=3, **kw) == first
    assert generate(model, tokenizer, PROMPTS, seed=4, **kw) != first
    assert len(first) == len(PROMPTS) and all(isinstance(r, str) and r for r in first)
    assert all(len(r.split()) <= 8 for r in first)
    top2 = generate(model, tokenizer, PROMPTS, seed=3, top_k=2, **kw)
    assert top2 != first and generate(model, tokenizer, PROMPTS, seed=3, top_k=2, **kw) == top2


def test_generate_argument_errors(lm):
    model, tokenizer = lm
    assert generate(model, tokenizer, [], max_new_tokens=4) == []
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, tokenizer, PROMPTS[:1], max_new_tokens=60)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokenizer, PROMPTS[:1], max_new_tokens=0)
    with pytest.raises(ValueError, match="no token"):
        generate(model, tokenizer, [""], max_new_tokens=2, bos_id=None)
    # With its BOS an empty prompt is fine (same shapes as the greedy test: no new compilation).
    assert len(generate(model, tokenizer, ["", PROMPTS[0]], max_new_tokens=8, top_k=1, batch_size=2)) == 2
