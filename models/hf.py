"""The fallback forward: any Hugging Face causal LM with RoPE, behind the same small interface as
models/transformer.py's Transformer.forward (a models/batch.py Batch in, ForwardOutput out), so the
rest of Rotary has one KV cache type.

Models the own forward does not support (see transformer.supports) run here. They keep
everything that needs no layer access (completion, edit-aware caches, drafts verified in
one forward) and lose what does (running a slice of layers, hidden states: early exit).

Each call lends the model the cache's K/V as a transformers DynamicCache (views of the
cache's tensor, no copy), lets the model append the new tokens' K/V, and writes those
back into the cache's slots. transformers copies the cache once per call to append; that
is the price of the fallback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .batch import Batch, ForwardOutput
from .transformer import unpacked_rows


def load_hf_model(model_dir: Path, dtype: torch.dtype, device: str | torch.device) -> tuple[Any, Any]:
    """A model folder loaded by transformers: (model in eval mode, tokenizer). A GGUF's prepared folder
    (loader.py) holds no weights: transformers reads them from the GGUF itself (slow: it dequantises
    with numpy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    source = model_dir / "rotary-source.json"
    if source.is_file():
        gguf = Path(json.loads(source.read_text())["gguf"])
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype, local_files_only=True)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    return model.to(device).eval(), tokenizer


class HFForward:
    """The small forward interface (models/batch.py's Forward) on top of a Hugging Face model.

    It runs every layer on ids: whatever a Batch describes. What needs layer access (a slice of
    layers, hidden states in or out, early exit: Transformer's run_layers, head, copy_state) it
    does not have; ModelRunner.layer_access says so, and ModelRunner.exit_forward refuses there.
    """

    def __init__(self, model: Any):
        import inspect

        self.model = model
        # transformers renamed `past_key_values` to `cache` (5.2x); pass whichever this version takes.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def __call__(self, **fields: Any) -> ForwardOutput:
        """The forward as cache/buffer.py calls it: the Batch's fields as keywords."""
        return self.forward(Batch(**fields))

    @torch.inference_mode()
    def forward(self, batch: Batch) -> ForwardOutput:
        from transformers import DynamicCache

        if batch.ids is None:
            raise ValueError("this model runs through transformers: it takes ids, not hidden states (no layer access)")
        batch.check_capacity()
        ids, seq, logits, logit_rows = batch.ids, batch.width, batch.logits, batch.logit_rows
        n_layers = batch.caches[0].kv.shape[0]
        rows_last, rows_all = [], []
        wanted = set(range(batch.rows) if logit_rows is None else logit_rows)  # rows whose logits "all" returns
        for b, (cache, start, real) in enumerate(zip(batch.caches, batch.starts, batch.lengths)):
            lent = DynamicCache(config=self.model.config)
            if start:
                for layer in range(n_layers):
                    keys = cache.kv[layer, 0, :, :start].unsqueeze(0)  # [1, KV, start, Dh]
                    values = cache.kv[layer, 1, :, :start].unsqueeze(0)
                    lent.update(keys, values, layer)
            positions = torch.arange(start, start + real, device=ids.device)
            out = self.model(
                input_ids=ids[b : b + 1, :real],
                **{self._cache_kwarg: lent},
                position_ids=positions.unsqueeze(0),
                cache_position=positions,
                use_cache=True,
                logits_to_keep=0 if logits == "all" and b in wanted else 1,
            )
            for layer in range(n_layers):
                new_keys = lent.layers[layer].keys[0, :, -real:]  # [KV, real, Dh]
                cache.kv[layer, 0, :, start : start + real].copy_(new_keys)
                cache.kv[layer, 1, :, start : start + real].copy_(lent.layers[layer].values[0, :, -real:])
            if logits == "all" and b in wanted:
                rows_all.append(out.logits[0])  # [real, vocab]
            elif logits == "last":
                rows_last.append(out.logits[0, -1])  # [vocab]
        if logits == "all":  # [B, S, vocab] (or the logit_rows' rows, S their longest), padding zero
            lengths = [row.shape[0] for row in rows_all]
            return ForwardOutput(unpacked_rows(torch.cat(rows_all), lengths, seq if logit_rows is None else max(lengths)), None)
        if logits == "last":
            return ForwardOutput(torch.stack(rows_last), None)  # [B, vocab]
        return ForwardOutput(None, None)
