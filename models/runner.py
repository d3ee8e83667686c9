"""The forward pass the worker calls: token ids in, logits out, K/V written into the caller's cache.

One place owns how the model is called (which forward, device, dtype, thread count), so
the decoding loop in completion/ and the cache in cache/ never touch transformers'
calling conventions. Llama-family models (SmolLM2, Llama, Qwen2, Mistral) run on
Rotary's own forward (transformer.py); any other RoPE model runs through transformers
(hf.py) behind the same contract. The loader decides which (loader.load_model; ROTARY_FORWARD=hf
forces the fallback, for benchmarks).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from typing import Callable

import torch

from .hf import HFForward
from .batch import Batch, ForwardOutput
from .exits import ExitHeads, find_exit_heads, forward_with_exits, model_fingerprint
from .precision import choose_once, pack, requested
from .loader import LoadedModel, cache_dir
from .transformer import Transformer

log = logging.getLogger(__name__)

# Forward calls with at most this many tokens run on decode_threads() (see ModelRunner.forward).
DECODE_STEP_TOKENS = 16
# A decoding round of at least this many documents runs on every core all the same: its matrix
# products are several rows deep, where a second thread pays even on a shared machine (20 editors,
# `rotary bench load --quick --sizes 20`: p95 4.6-4.9 s against 5.3-6.2 s on one thread).
WIDE_BATCH_ROWS = 4


def configure_threads() -> None:
    """Use every core for matmuls but keep inter-op threads at 1: one forward runs at a time."""
    torch.set_num_threads(prefill_threads())


def prefill_threads() -> int:
    return int(os.environ.get("ROTARY_THREADS", "0")) or (os.cpu_count() or 1)


def decode_threads() -> int:
    """Threads for decoding steps (a few tokens: one token, a verify step, a batch of documents): half the cores.

    Measured on 2 AVX2 cores (EPYC), 2026-11-30: alone, a one-token forward took 43-48 ms on 2 threads
    against 54-69 ms on 1; but under `rotary bench load`, where the LSP daemon and the editor share
    the cores with the worker, 2 threads made every step slower (one document: 131 against 90 ms a
    step; twenty: 268 against 240 ms a round, p95 latency 11.8 against 8.6-9.0 s): an OpenMP thread
    that loses its core stalls the whole product. With one thread the other core serves the daemon
    and gRPC. `ROTARY_DECODE_THREADS` overrides it (a worker alone on its machine). Wide batched
    rounds take every core (WIDE_BATCH_ROWS).
    """
    return int(os.environ.get("ROTARY_DECODE_THREADS", "0")) or max(1, prefill_threads() // 2)


def _return_freed_memory() -> None:
    """Give the float32 weights that packing dropped back to the system. glibc keeps freed blocks under
    its mmap threshold (a layer's matrices are 1-7 MB) in the heap, so without a trim the worker's RSS
    stays as if they were there (measured: int4 1.03 GB without, 0.63 GB with)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


class ModelRunner:
    """The loaded model as the worker calls it: one forward (Rotary's own, or the transformers
    fallback), the tokenizer's texts, and the model's RoPE facts."""

    def __init__(self, loaded: LoadedModel, precision: str | None = None):
        """precision: exact, fp16, int4 or auto (precision.py; default $ROTARY_PRECISION, else auto). The own
        forward's matrices are packed here, after the loader's float32 load; the fallback keeps its dtype."""
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.info = loaded.info
        self._prefill_threads, self._decode_threads = prefill_threads(), decode_threads()
        # The loader chose the path (load_model: own forward, or transformers); only the own forward
        # gives layer access (early exit).
        wanted = requested(precision)
        self.fingerprint = ""  # which calibration artifacts fit (exit heads: the own forward only)
        if isinstance(self.model, Transformer):
            if self.model.precision != "exact":
                raise ValueError(f"a ModelRunner takes load_model's float32 model; this one is packed as {self.model.precision} already")
            self.fingerprint = model_fingerprint(loaded.config, self.tokenizer, self.model)  # float32, before packing
            self.path, self._forward = "own", self.model
            self.device, self.dtype = self.model.device, self.model.dtype
            self.precision, self.precision_reason = wanted, "asked for"
            if self.device.type != "cpu" or self.dtype != torch.float32:
                self.precision, self.precision_reason = "exact", f"{self.device.type} {self.dtype}: the packed kernels are for float32 on CPU"
            elif wanted == "auto":
                choice = choose_once(self.model, self._decode_threads, self.fingerprint, cache_dir() / "precision", loaded.blocks)
                self.precision, self.precision_reason = choice.precision, choice.reason
            pack(self.model, self.precision, loaded.blocks)
            _return_freed_memory()
            if self.precision != "exact":  # K/V computed in another precision: KV snapshots must not mix
                identity = hashlib.sha256(f"{self.info.identity}:{self.precision}".encode()).hexdigest()[:20]
                self.info = dataclasses.replace(self.info, identity=identity)
            log.info("%s runs in precision %s (%s)", self.info.name, self.precision, self.precision_reason)
        else:
            self.path, self._forward = "hf", HFForward(self.model)
            parameter = next(self.model.parameters())
            self.device, self.dtype = parameter.device, parameter.dtype
            self.precision, self.precision_reason = "exact", "the transformers fallback runs in its loaded dtype"
        self.layer_access = self.path == "own"
        # Exit heads (early exit, self-speculation) and the abstention gate, when calibrated for this model.
        self.exits, self.exits_from = None, ""
        if self.layer_access:
            exits, self.exits_from = find_exit_heads(self.fingerprint)
            if exits is not None:
                self.exits = exits.to(self.device, self.dtype)
                log.info("exit heads after layers %s from %s", list(exits.layers), self.exits_from)
            else:
                log.info("no exit heads for this model (run `rotary calibrate`): no early exit, no abstention")

    def forward(self, **fields) -> ForwardOutput:
        """The model's forward on a models/batch.py Batch, called as cache/buffer.py calls one (the Batch's
        fields as keywords). The thread count follows the work: decoding steps (a few tokens) on
        decode_threads(), bigger steps (prefill, wide batches) on every core."""
        batch = Batch(**fields)
        self._set_threads(batch)
        return self._forward.forward(batch)

    def exit_forward(self, heads: ExitHeads | None = None) -> Callable[..., ForwardOutput]:
        """`forward` with early exit at `heads` (default: the calibrated exit heads): models/exits.py's
        forward_with_exits, called as `forward` is. Refused, here and only here, where the model has no
        layer access (the transformers fallback) or no exit heads."""
        heads = heads if heads is not None else self.exits
        if not self.layer_access or heads is None:
            why = "it runs through transformers (no layer access)" if not self.layer_access else "it has no exit heads"
            raise ValueError(f"{self.info.name} cannot exit early: {why}")

        def forward(**fields) -> ForwardOutput:
            batch = Batch(**fields)
            self._set_threads(batch)
            return forward_with_exits(self._forward, heads, batch)

        return forward

    def _set_threads(self, batch: Batch) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads_for(batch.rows * batch.width, batch.rows))

    def threads_for(self, tokens: int, rows: int) -> int:
        """The threads a CPU forward of `tokens` tokens in `rows` rows runs on (see forward)."""
        wide = rows >= WIDE_BATCH_ROWS
        return self._decode_threads if tokens <= DECODE_STEP_TOKENS and not wide else self._prefill_threads

    def rope_inv_freq(self) -> torch.Tensor | None:
        """The model's own RoPE inverse frequencies (scaling included), for re-rotating cached keys."""
        if self.path == "own":
            return self.model.inv_freq
        rotary = getattr(getattr(self.model, "model", None), "rotary_emb", None)
        inv_freq = getattr(rotary, "inv_freq", None)
        if inv_freq is None or getattr(rotary, "rope_type", "default") == "dynamic":
            return None
        return inv_freq.detach().to(torch.float32)

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
