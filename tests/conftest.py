"""Shared fixtures: the real embedded model, and a greedy oracle computed with transformers alone."""

from __future__ import annotations

import functools
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=1)
def reference_model():
    """The embedded model loaded with plain transformers (no Rotary code path), for oracles."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rotary.models.loader import resolve_model_dir

    model_dir = resolve_model_dir(None)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    return model, tokenizer


def greedy_continuation(text_before: str, max_new_tokens: int = 48) -> str:
    """What plain transformers greedy decoding produces after `text_before`."""
    import torch

    model, tokenizer = reference_model()
    ids = tokenizer.encode(text_before, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip()


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
