"""Fill-in-the-middle for models whose tokenizer has FIM tokens, with a tiny random model built here.

The model is random, so its text is junk, but it is deterministic: the engine must
build the prefix-suffix-middle prompt (healing at the prefix boundary) and decode
exactly what transformers decodes on the prompt this test builds itself: the
documented FIM format written as text (`<fim_prefix>` the text before the cursor less
the healed text `<fim_suffix>` the text after it `<fim_middle>`, StarCoder's PSM form)
and tokenized by the model's tokenizer (tests/conftest.py `oracle_prompt`).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import greedy_continuation, oracle_prompt

pytestmark = pytest.mark.model

FIM_TOKENS = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>"]


@pytest.fixture(scope="module")
def fim_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rotary.models.loader import resolve_model_dir

    target = tmp_path_factory.mktemp("tiny-fim")
    source = resolve_model_dir(None)
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": FIM_TOKENS})
    tokenizer.save_pretrained(target)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=0,
    )
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(target)
    return target


def single_line(text: str) -> str:
    """The documented single-line rule: up to the first line break after non-blank text."""
    stripped = text.lstrip("\r\n")
    lead = text[: len(text) - len(stripped)]
    line = stripped.split("\n", 1)[0]
    return (lead + line).rstrip() if line.strip() or "\n" not in stripped else ""


def test_fim_prompt_and_greedy_middle_match_transformers(fim_model_dir):
    """Mutation check (2026-12-07): prefix and suffix swapped in completion/engine.py build_context
    (`[fim["prefix"], *suffix_ids, fim["suffix"], *prefix ids, ...]`) fails it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine, CompletionOptions
    from rotary.models.loader import load_model
    from rotary.models.runner import ModelRunner

    loaded = load_model(fim_model_dir)
    fim = loaded.info.fim_tokens
    tokenizer = AutoTokenizer.from_pretrained(str(fim_model_dir), local_files_only=True)
    assert fim == {"prefix": tokenizer.convert_tokens_to_ids("<fim_prefix>"),
                   "suffix": tokenizer.convert_tokens_to_ids("<fim_suffix>"),
                   "middle": tokenizer.convert_tokens_to_ids("<fim_middle>")}
    engine = CompletionEngine(ModelRunner(loaded), KVStore())
    model = AutoModelForCausalLM.from_pretrained(str(fim_model_dir), dtype=torch.float32, local_files_only=True).eval()

    before = "def area(width, height):\n    "
    after = "\n    return result\n\n\nprint(area(2, 3))\n"
    prompt = engine.build_context(before + after, len(before), 16)
    assert prompt.fim and prompt.ids[0] == fim["prefix"] and prompt.ids[-1] == fim["middle"]
    assert (prompt.ids, prompt.heal) == oracle_prompt(before, after, tokenizer, fim=True)
    assert prompt.heal == "\n    "

    options = CompletionOptions(max_tokens=16, mode="single_line", cache_mode="none")
    got = "".join(c.text for c in engine.complete("file:///fim.py", before + after, len(before), options))
    raw = greedy_continuation(
        before, 16, text_after=after, model_and_tokenizer=(model, tokenizer), fim=True,
        eos=set(loaded.info.eos_token_ids),
    )
    assert single_line(raw).strip(), f"the oracle produced nothing on the line ({raw!r}); the test would be vacuous"
    assert got == single_line(raw)


def test_without_code_after_the_cursor_the_prompt_is_plain(fim_model_dir):
    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine
    from rotary.models.loader import load_model
    from rotary.models.runner import ModelRunner

    engine = CompletionEngine(ModelRunner(load_model(fim_model_dir)), KVStore())
    text = "def area(width, height):\n    return width"
    prompt = engine.build_context(text, len(text), 16)
    assert not prompt.fim and engine.runner.info.fim_tokens["prefix"] not in prompt.ids
