"""A model's tokenizer from its tokenizer.json, through the `tokenizers` library alone.

transformers' fast tokenizers are this same library underneath; importing transformers to reach it
costs a worker 2-7 s of start-up. The few calls Rotary makes keep transformers' names and meaning
(`encode(text, add_special_tokens=False)`, `decode(ids, skip_special_tokens=...)`, `get_vocab()`,
`len()`, `eos_token_id`, `all_special_ids`), so every caller works with either; which tokens are
special and which ends a text come from the prepared facts (loader.prepare_facts), where transformers
itself decided them once. tests/test_loader.py compares the two tokenizers on real code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


class Tokenizer:
    """The calls Rotary makes on a tokenizer, on `tokenizers.Tokenizer` (see the module's notes)."""

    def __init__(self, tokenizer_file: str | Path, special_ids: Sequence[int], eos_token_id: int | None):
        from tokenizers import Tokenizer as Backend

        self.backend = Backend.from_file(str(tokenizer_file))
        self.all_special_ids = list(special_ids)
        self.eos_token_id = eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        if clean_up_tokenization_spaces:
            raise ValueError("clean_up_tokenization_spaces is not supported: Rotary decodes text exactly")
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)
