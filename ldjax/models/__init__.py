"""NNX models: the causal transformer family (GPT-NeoX / Qwen2) and its Hugging Face import.

``TransformerConfig``, ``CausalLM``, ``load_pretrained`` and ``save_pretrained`` are loaded on
first access, so importing a sibling module (``ldjax.models.functional``, ``ldjax.models.vision``)
does not pull in the checkpoint machinery.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TransformerConfig": "ldjax.models.transformer",
    "CausalLM": "ldjax.models.transformer",
    "TransformerConfigError": "ldjax.models.transformer",
    "load_pretrained": "ldjax.models.hf",
    "save_pretrained": "ldjax.models.hf",
    "PretrainedFormatError": "ldjax.models.hf",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ldjax.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
