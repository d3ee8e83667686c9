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
    """Greedy decoding after `text_before` with plain transformers, with token healing as Rotary does it.

    Token healing: the last token of the text is taken off; the first generated token must be one
    whose text starts with it; the returned text does not repeat it.
    """
    import torch

    model, tokenizer = reference_model()
    ids = tokenizer.encode(text_before, add_special_tokens=False)
    heal = tokenizer.decode(ids[-1:], clean_up_tokenization_spaces=False) if len(ids) >= 2 else ""
    if heal:
        ids = ids[:-1]
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1]
        if heal:
            allowed = [
                i
                for i in range(model.config.vocab_size)
                if i not in tokenizer.all_special_ids
                and tokenizer.decode([i], clean_up_tokenization_spaces=False).startswith(heal)
            ]
            masked = torch.full_like(logits, float("-inf"))
            masked[allowed] = logits[allowed]
            logits = masked
        first = int(logits.argmax())
        out = model.generate(
            torch.tensor([ids + [first]]), max_new_tokens=max_new_tokens - 1, do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    generated = out[0, len(ids) :].tolist()
    eos = {0, 2, 5}  # <|endoftext|>, <|im_end|>, <file_sep>: SmolLM2's end-of-text tokens
    for i, token in enumerate(generated):
        if token in eos:
            generated = generated[:i]
            break
    text = tokenizer.decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text[len(heal) :] if text.startswith(heal) else text


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip()


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
