"""The forward pass the worker calls: tokens in, next-token logits out, KV cache extended.

One place owns how the model is called (device, dtype, no-grad, thread count),
so the decoding loop in completion/ and the cache in cache/ never touch
transformers' calling conventions directly.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading

import torch

from .loader import LoadedModel


def configure_threads() -> None:
    """Use every core for matmuls but keep inter-op threads at 1: one request runs at a time."""
    torch.set_num_threads(prefill_threads())


def prefill_threads() -> int:
    return int(os.environ.get("ROTARY_THREADS", "0")) or (os.cpu_count() or 1)


def decode_threads() -> int:
    """Threads for one-token steps: half the cores.

    A one-token step is hundreds of small matrix-vector products whose cost is mostly per-op
    overhead: on 2 cores it runs as fast on 1 thread as on 2 (measured: 61 vs 60 ms/token),
    and the idle core then serves the LSP daemon and gRPC instead of a spinning OpenMP thread.
    """
    return max(1, prefill_threads() // 2)


class ModelRunner:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.info = loaded.info
        self.device = next(self.model.parameters()).device
        self._prefill_threads, self._decode_threads = prefill_threads(), decode_threads()
        # The model is shared by every request; one forward at a time.
        self.lock = threading.Lock()
        # transformers renamed `past_key_values` to `cache` (5.2x); pass whichever this version takes.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def forward(self, token_ids: list[int], cache, start_position: int) -> torch.Tensor:
        """Run `token_ids` at positions start_position.. attending to `cache`; return the last logits [vocab].

        The cache must hold exactly `start_position` tokens; it is extended in place.
        """
        assert token_ids, "forward needs at least one token"
        if self.device.type == "cpu":
            torch.set_num_threads(self._decode_threads if len(token_ids) == 1 else self._prefill_threads)
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, S]
        positions = torch.arange(start_position, start_position + len(token_ids), device=self.device)
        out = self.model(
            input_ids=input_ids,
            **{self._cache_kwarg: cache},
            position_ids=positions.unsqueeze(0),
            cache_position=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[0, -1]  # [vocab]

    def rope_inv_freq(self) -> torch.Tensor | None:
        """The model's own RoPE inverse frequencies (scaling included), for re-rotating cached keys."""
        rotary = getattr(getattr(self.model, "model", None), "rotary_emb", None)
        inv_freq = getattr(rotary, "inv_freq", None)
        if inv_freq is None or getattr(rotary, "rope_type", "default") == "dynamic":
            return None
        return inv_freq.detach().to(torch.float32)

    def warm_up(self) -> None:
        self.token_texts  # built once here rather than on the first keystroke
        cache = self.new_cache()
        logits = self.forward(self.encode_text("def main():\n    return 0\n") or [0], cache, 0)
        self.forward([int(logits.argmax())], cache, cache.get_seq_length())

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(int(i) for i in self.tokenizer.all_special_ids)

    @functools.cached_property
    def token_texts(self) -> list[str]:
        return [self.tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in range(len(self.tokenizer))]

    def token_text(self, token_id: int) -> str:
        return self.token_texts[token_id]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode_ids(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
