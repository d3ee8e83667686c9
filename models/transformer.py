"""Rotary's own forward for the Llama family (Llama, SmolLM2, Qwen2 with its QKV bias, Mistral).

Size (~570 lines, over the ~400 the project aims at): the whole forward is one file, like gpt-fast's
model.py, so a reader follows a token through every layer without leaving it; the weights' forms live
in precision.py, batches in batch.py, early exit in exits.py.

One plain loop over layers, in the style of gpt-fast's model.py: `forward(batch)` takes a
models/batch.py Batch (rows, their start positions and real lengths, which logits) and
runs every layer. The pieces are methods of their own, `embedded`, `run_layers(hidden, layers,
batch)` and `head(hidden, batch)`, so that a caller can run a slice of layers and stop
early (models/exits.py's forward_with_exits, a visible loop), take the hidden state after any
layer (exit classifiers), and fill later layers afterwards. It takes weights by their Hugging Face
names (`Transformer.from_weights`: loader.py reads them from a GGUF or safetensors, no transformers
involved; `from_hf` takes a loaded transformers model's). transformers stays the test oracle and the
fallback for other architectures (`supports_config` says which path a model can take, and why).

The KV cache is not owned here: `forward` writes each new token's K/V into the slot
equal to its position of any object with batch.py's `KVCache` attribute protocol
(cache/buffer.py's KVBuffer is the one Rotary uses), and attends to slots [0, position].
It neither resizes the cache (its owner reserves room before the call; the forward asserts
it) nor moves its fill pointers (KVBuffer.extend does, so ids and tensors change together).

Speed on a CPU (measured, see bench/decode.py): one token's decode step reads every
weight once, so it is bound by memory bandwidth plus per-op overhead. Hence fused
projections (one QKV matmul, one gate/up matmul: fewer and larger reads), weights stored
input-major and one-row products split along their inner dimension (`linear`), K/V written
in place into a preallocated buffer (no torch.cat of the whole cache per step, which is
what a DynamicCache does), GQA through SDPA's enable_gqa (no repeated K/V), RoPE tables
built once, and the last layer and LM head run only on the positions whose output is used.
Weights keep the loaded model's values and dtype (nothing quantised), so outputs equal
transformers' within float32 rounding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .batch import Batch, ForwardOutput, KVCache, Logits  # noqa: F401 (KVCache, Logits: re-exported)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")

# RoPE variants whose frequencies are fixed at load time, so their rotations compose
# (R_a R_b = R_(a+b)) for any a, b: re-rotating cached keys by a position delta is exact,
# and Rotary's own forward (transformer.py) computes its tables once. "dynamic" NTK changes
# the frequencies with the sequence length and "longrope" switches between two frequency
# sets, so those do neither.
COMPOSABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class Segment(NamedTuple):
    """One row of a forward, packed: its tokens are x[0, offset : offset + length], at positions
    [start, start + length) of `cache`."""

    cache: Any
    start: int
    offset: int
    length: int


class Step(NamedTuple):
    """What every layer of one forward shares, built once per call (Transformer._step)."""

    segments: list[Segment]
    cos: torch.Tensor  # [1, N, 1, head_dim]
    sin: torch.Tensor  # [1, N, 1, head_dim]
    masks: dict  # per sliding window (None: full), per segment: (first slot attended, mask, is_causal)


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    sliding_windows: tuple[int | None, ...]  # per layer: attend to the last w positions (self included); None: all
    rope_scaling: float = 1.0  # yarn's attention factor: multiplies cos and sin

    @property
    def n_groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, config: Any) -> TransformerConfig:
        n_heads = int(config.num_attention_heads)
        n_layers = int(config.num_hidden_layers)
        return cls(
            vocab_size=int(config.vocab_size),
            dim=int(config.hidden_size),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // n_heads),
            intermediate_size=int(config.intermediate_size),
            norm_eps=float(config.rms_norm_eps),
            sliding_windows=sliding_windows(config),
        )


def sliding_windows(config: Any) -> tuple[int | None, ...]:
    """Per layer, the attention window as transformers applies it (None: full causal attention).

    Qwen2 names its sliding layers in `layer_types` (and sets sliding_window to None unless
    use_sliding_window); Mistral applies `sliding_window` to every layer; Llama has none.
    """
    n_layers = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if getattr(config, "model_type", "") == "llama" or not window:
        return (None,) * n_layers
    if layer_types is not None:
        return tuple(int(window) if kind == "sliding_attention" else None for kind in layer_types)
    return (int(window),) * n_layers


def supports_config(config: Any, rope: dict | None) -> tuple[bool, str]:
    """Whether a model of this config (transformers' attributes) and RoPE tables (loader.prepare_facts's
    "rope": type, inv_freq, attention_scaling) can run on this forward; the reason names what decided it."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return False, f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if (getattr(config, "hidden_act", None) or "silu") != "silu":
        return False, f"activation {config.hidden_act!r} is not silu"
    if getattr(config, "mlp_bias", False):
        return False, "MLP biases are not supported"
    if int(getattr(config, "pretraining_tp", 1) or 1) != 1:
        return False, "pretraining_tp > 1 is not supported"
    if not rope or not rope.get("inv_freq"):
        return False, "no rotary embedding with inv_freq"
    rope_type = rope.get("type", "default")
    if rope_type not in COMPOSABLE_ROPE_TYPES:  # "dynamic", "longrope": frequencies recomputed per forward
        return False, f"RoPE type {rope_type!r} recomputes its frequencies per sequence length"
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    if 2 * len(rope["inv_freq"]) != head_dim:
        return False, f"partial rotary ({2 * len(rope['inv_freq'])} of {head_dim} dims) is not supported"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and set(layer_types) - {"full_attention", "sliding_attention"}:
        return False, f"layer types {sorted(set(layer_types))} are not supported"
    windows = [w for w in sliding_windows(config) if w]
    detail = f", sliding window {windows[0]} on {len(windows)} layers" if windows else ""
    return True, f"{model_type}, RoPE {rope_type}{detail}"


def rope_of(hf_model: Any) -> dict | None:
    """A loaded transformers model's RoPE tables, in supports_config's form."""
    rotary = getattr(getattr(hf_model, "model", None), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        return None
    return {
        "type": str(getattr(rotary, "rope_type", "default")),
        "inv_freq": inv_freq.float().tolist(),
        "attention_scaling": float(getattr(rotary, "attention_scaling", 1.0)),
    }


def supports(hf_model: Any) -> tuple[bool, str]:
    """supports_config for a loaded transformers model."""
    return supports_config(getattr(hf_model, "config", None), rope_of(hf_model))


@dataclass
class LayerWeights:
    """One layer's weights. Matrices are stored input-major, [in, out] (the transpose of nn.Linear's
    weight): see `linear` for why."""

    attn_norm: torch.Tensor  # [dim]
    wqkv: torch.Tensor  # [dim, (n_heads + 2 * n_kv_heads) * head_dim]: q, k, v side by side
    bqkv: torch.Tensor | None  # [(n_heads + 2 * n_kv_heads) * head_dim] (Qwen2, Llama attention_bias)
    wo: torch.Tensor  # [n_heads * head_dim, dim]
    bo: torch.Tensor | None  # [dim] (Llama attention_bias)
    mlp_norm: torch.Tensor  # [dim]
    w_gate_up: torch.Tensor  # [dim, 2 * intermediate]: gate, up side by side
    w_down: torch.Tensor  # [intermediate, dim]


# Rows of input up to which `linear` splits the inner dimension (see there), and into how many parts.
# Up to 3 rows, BLAS gives each row the same result as alone (measured): a batched decode step of up
# to 3 documents is bit-identical to decoding each alone. Beyond that neither path is (a row in a batch
# of 4 or more differs from the row alone by ~3e-5 in the logits either way), and the split is as fast
# or faster for the few rows of decoding (1 thread, a whole forward: a verify step of 9 tokens 171-174
# against 193-241 ms, 5 tokens 148-156 against 162-168; batches of 8-16 documents even, within noise).
# Past 32 rows (prefill chunks) one product wins.
SPLIT_ROWS = 32
SPLIT_PARTS = 8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight (+ bias) for an input-major weight [in, out]; x [..., in] -> [..., out].

    Why input-major. A decode step multiplies one row by every weight matrix, and is bound by
    reading the weights. On CPU, BLAS streams an [in, out] matrix noticeably faster for one or
    two rows than nn.Linear's [out, in] (measured on this model, 1 thread: all matmuls of one
    step 32 vs 38 ms, two rows 52 vs 78 ms), and about as fast for more rows (prefill).
    For up to SPLIT_ROWS rows the inner dimension is cut into SPLIT_PARTS pieces whose partial
    products are summed at the end: a plain [in, out] product accumulates each output over
    the whole inner dimension in order, whose rounding error is about 4x that of nn.Linear's
    dot products; summing 8 partial products makes it smaller than theirs (vs a float64
    reference: 4e-7 against 6e-7 relative), at the same speed.
    """
    inner = x.shape[-1]
    rows = x.numel() // inner
    flat = x.reshape(rows, inner)  # [R, in]
    if not isinstance(weight, torch.Tensor):  # fp16 or int4 (precision.py): its own kernel
        out = weight.matmul(flat)  # [R, out]
    elif rows <= SPLIT_ROWS and inner % SPLIT_PARTS == 0 and x.device.type == "cpu":
        parts = flat.reshape(SPLIT_PARTS, 1, -1) if rows == 1 else flat.reshape(rows, SPLIT_PARTS, -1).transpose(0, 1)  # [P, R, in / P]
        out = torch.bmm(parts, weight.view(SPLIT_PARTS, inner // SPLIT_PARTS, -1)).sum(0)  # [R, out]
    else:
        out = torch.mm(flat, weight)  # [R, out]
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[1])


class Transformer:
    """The forward pass over weights taken from a Hugging Face Llama-family model."""

    def __init__(
        self,
        config: TransformerConfig,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        norm: torch.Tensor,
        lm_head: torch.Tensor,
        inv_freq: torch.Tensor,
    ):
        assert len(layers) == config.n_layers and len(config.sliding_windows) == config.n_layers
        self.config = config
        self.embed = embed  # [vocab, dim] (when tied, a transposed view of lm_head)
        self.layers = layers
        self.norm = norm  # [dim]
        self.lm_head = lm_head  # [dim, vocab], input-major like every matrix here
        self.inv_freq = inv_freq.to(device=embed.device, dtype=torch.float32)  # [head_dim / 2]
        self.dtype = embed.dtype
        self.device = embed.device
        self.precision = "exact"  # precision.pack changes the matrices' form and this name
        # cos/sin of position * inv_freq for positions [0, len), grown by doubling: decoding reads a view.
        self._cos = torch.empty(0, config.head_dim, dtype=self.dtype, device=self.device)
        self._sin = self._cos

    @classmethod
    @torch.no_grad()
    def from_weights(
        cls,
        config: Any,
        rope: dict,
        weights: Iterable[tuple[str, torch.Tensor]],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Transformer:
        """The forward over a Llama-family model's weights, given by their Hugging Face names (see
        `supports_config`), with its config (transformers' attributes) and RoPE tables (rope_of's form).

        Matrices are stored input-major (see `linear`), q/k/v and gate/up fused into one each. Each
        layer is fused as soon as the weights are all read, and the originals dropped, so loading
        holds little more than the model.
        """
        ok, reason = supports_config(config, rope)
        if not ok:
            raise ValueError(f"this model cannot take Rotary's own forward: {reason}")
        tconfig = TransformerConfig.from_hf(config)
        tconfig = TransformerConfig(**{**tconfig.__dict__, "rope_scaling": float(rope.get("attention_scaling", 1.0))})
        tensors = {name: tensor.to(device=device, dtype=dtype) for name, tensor in weights}

        def take(name: str) -> torch.Tensor:
            if name not in tensors:
                raise ValueError(f"the weights have no {name}")
            return tensors.pop(name)

        def input_major(*names: str) -> torch.Tensor:  # [in, sum of outs]
            return torch.cat([take(name).t() for name in names], dim=1).contiguous()

        def bias(*names: str) -> torch.Tensor | None:
            present = [name in tensors for name in names]
            if not any(present):
                return None
            return torch.cat([take(name) for name in names], dim=0).contiguous()

        layers = []
        for i in range(tconfig.n_layers):
            p = f"model.layers.{i}."
            qkv = [f"{p}self_attn.{x}_proj" for x in "qkv"]
            layers.append(
                LayerWeights(
                    attn_norm=take(p + "input_layernorm.weight"),
                    wqkv=input_major(*(n + ".weight" for n in qkv)),
                    bqkv=bias(*(n + ".bias" for n in qkv)),
                    wo=input_major(p + "self_attn.o_proj.weight"),
                    bo=bias(p + "self_attn.o_proj.bias"),
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                    w_gate_up=input_major(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                    w_down=input_major(p + "mlp.down_proj.weight"),
                )
            )
        embed = take("model.embed_tokens.weight")  # [vocab, dim]
        head = tensors.pop("lm_head.weight", None)
        if getattr(config, "tie_word_embeddings", False) or head is None:
            # Tied: the embedding is a transposed view of the LM head (one tensor for both; see _embed).
            lm_head = embed.t().contiguous()  # [dim, vocab]
            embed = lm_head.t()
        else:
            lm_head = head.t().contiguous()
        inv_freq = torch.tensor(rope["inv_freq"], dtype=torch.float32)
        return cls(tconfig, embed, layers, take("model.norm.weight"), lm_head, inv_freq)

    @classmethod
    def from_hf(cls, hf_model: Any) -> Transformer:
        """The forward over a loaded transformers model's weights (copies: the model stays as it was)."""
        parameter = next(hf_model.parameters())
        weights = ((name, tensor.detach().clone()) for name, tensor in hf_model.state_dict().items())
        return cls.from_weights(hf_model.config, rope_of(hf_model), weights, parameter.dtype, parameter.device)

    # ------------------------------------------------------------------
    # The forward pass

    @torch.inference_mode()
    def forward(self, batch: Batch) -> ForwardOutput:
        """Every layer on the batch's ids, writing their K/V into its caches; the logits it asks for.

        Past the last layer only each row's last token is needed (logits "last") or nothing (None):
        that layer writes K/V for every token but runs attention and MLP on those rows only.
        """
        assert batch.ids is not None, "forward embeds ids; hidden states go through run_layers"
        step = self._step(batch)
        x = self._pack(self._embed(batch.ids), batch)  # [1, N, dim]
        trim = batch.logits != "all" and batch.width > 1
        last = self.config.n_layers - 1
        for i in range(self.config.n_layers):
            x = self._layer(i, x, step, keep_last=bool(batch.logits) if trim and i == last else None)
        return ForwardOutput(self._logits(x, step.segments, batch, trimmed=trim))

    def __call__(self, **fields: Any) -> ForwardOutput:
        """The forward as cache/buffer.py calls it: the Batch's fields as keywords (see models/batch.py)."""
        return self.forward(Batch(**fields))

    def embedded(self, batch: Batch) -> torch.Tensor:
        """The batch's ids as hidden states entering layer 0, [B, S, dim]."""
        assert batch.ids is not None, "embedded needs the batch's ids"
        return self._embed(batch.ids)

    @torch.inference_mode()
    def run_layers(self, hidden: torch.Tensor, layers: range, batch: Batch) -> torch.Tensor:
        """Run `layers` on hidden [B, S, dim] (the state entering layers.start), writing their K/V into
        the batch's caches; the hidden state after the last of them, [B, S, dim] (padding zero)."""
        config = self.config
        assert layers.step == 1 and 0 <= layers.start < layers.stop <= config.n_layers, f"bad layer range {layers}"
        assert hidden.shape[:2] == (batch.rows, batch.width), f"hidden {list(hidden.shape)} for {batch.rows} x {batch.width}"
        step = self._step(batch)
        x = self._pack(hidden, batch)  # [1, N, dim]
        for i in layers:
            x = self._layer(i, x, step)
        return unpacked_rows(x[0], batch.lengths, batch.width)  # [B, S, dim]

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        """Final norm and LM head on hidden [B, S, dim], for the rows and positions the batch asks logits of."""
        return self._logits(self._pack(hidden, batch), self._segments(batch), batch, trimmed=False)

    def slice(self, layers: range, hidden: torch.Tensor | None = None) -> LayerSlice:
        """A forward for cache/buffer.py that runs `layers` only (from `hidden`, or from the ids when
        layers start at 0) and returns the hidden state after them too (early exit, fill, calibration)."""
        return LayerSlice(self, layers, hidden)

    @torch.inference_mode()
    def copy_state(self, hidden: torch.Tensor, batch: Batch, skipped: range) -> None:
        """K/V of the layers an early exit skipped, from the exiting hidden state [1, 1, dim] (SEC's state copying).

        Each skipped layer projects the state (after its own input norm) to keys and values and rotates
        the keys: later tokens then find K/V in every layer. Approximate: the layer never saw the
        attention and MLP outputs of the layers before it (bench exit measures what that costs).
        """
        assert batch.rows == 1 and batch.width == 1, "state copying is for one token of one document"
        config = self.config
        heads, kv_heads, head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        cos, sin = self._rope(self._segments(batch))
        cache, start = batch.caches[0], batch.starts[0]
        x = hidden.reshape(1, 1, -1)
        for j in skipped:
            w = self.layers[j]
            h = F.rms_norm(x, (config.dim,), w.attn_norm, config.norm_eps)[0]  # [1, dim]
            if isinstance(w.wqkv, torch.Tensor):
                kv = torch.mm(h, w.wqkv[:, heads * head_dim :])  # [1, 2 * KV * Dh]
                if w.bqkv is not None:
                    kv = kv + w.bqkv[heads * head_dim :]
            else:  # packed (precision.py): the whole product, then its K/V columns
                kv = linear(h, w.wqkv, w.bqkv)[:, heads * head_dim :]
            kv = kv.view(1, 1, 2 * kv_heads, head_dim)  # [B, S, 2KV, Dh]
            rope_(kv[:, :, :kv_heads], cos, sin)
            new_kv = kv[0].view(1, 2, kv_heads, head_dim).permute(1, 2, 0, 3)  # [2, KV, 1, Dh]
            cache.kv[j, :, :, start : start + 1].copy_(new_kv)

    # -- packing: rows into one sequence of their real tokens ----------------

    def _segments(self, batch: Batch) -> list[Segment]:
        offsets = [0, *itertools.accumulate(batch.lengths)][:-1]  # where each row's tokens start in the packed sequence
        return [Segment(c, s, o, n) for c, s, o, n in zip(batch.caches, batch.starts, offsets, batch.lengths)]

    def _pack(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[B, S, dim] -> [1, N, dim], the real tokens only: the matrix products run on N rows, not on
        B x S with padding (ragged rows: a decoding round's rows differ in guesses)."""
        if not batch.ragged:
            return x.reshape(1, batch.rows * batch.width, -1)
        lengths = torch.tensor(batch.lengths, device=x.device)
        real = torch.arange(batch.width, device=x.device)[None, :] < lengths[:, None]  # [B, S]
        return x[real].unsqueeze(0)

    def _step(self, batch: Batch) -> Step:
        """What every layer of this batch shares: its segments, RoPE tables and attention masks."""
        batch.check_capacity()
        segments = self._segments(batch)
        cos, sin = self._rope(segments)  # [1, N, 1, head_dim] each
        return Step(segments, cos, sin, self._masks(segments, set(self.config.sliding_windows)))

    def _logits(self, x: torch.Tensor, segments: list[Segment], batch: Batch, trimmed: bool) -> torch.Tensor | None:
        """The logits `batch` asks for, from packed x [1, N, dim] ([1, B, dim] when the last layer was trimmed)."""
        if batch.logits == "last":
            last = x[0] if trimmed else x[0, [seg.offset + seg.length - 1 for seg in segments]]  # [B, dim]
            return self._head(last)  # [B, vocab]
        if batch.logits == "all" and batch.logit_rows is not None:
            picked = [segments[r] for r in batch.logit_rows]
            index = torch.cat([torch.arange(seg.offset, seg.offset + seg.length, device=x.device) for seg in picked])
            lengths = [seg.length for seg in picked]
            return unpacked_rows(self._head(x[0, index]), lengths, max(lengths))  # [R, S', vocab]
        if batch.logits == "all":
            return unpacked_rows(self._head(x[0]), batch.lengths, batch.width)  # [B, S, vocab]
        return None

    def _layer(self, i: int, x: torch.Tensor, step: Step, keep_last: bool | None = None) -> torch.Tensor:
        """One decoder layer on packed rows x [1, N, dim] (segments say whose tokens are where).

        keep_last: run attention and MLP only for each segment's last token (K/V are written for all),
        returning [1, B, dim]; False: write K/V only (nothing reads this layer's output)."""
        config, w = self.config, self.layers[i]
        segments, cos, sin, masks = step.segments, step.cos, step.sin, step.masks[config.sliding_windows[i]]
        tokens = x.shape[1]
        heads, kv_heads, head_dim = config.n_heads, config.n_kv_heads, config.head_dim

        h = F.rms_norm(x, (config.dim,), w.attn_norm, config.norm_eps)  # [1, N, dim]
        qkv = linear(h, w.wqkv, w.bqkv).view(1, tokens, heads + 2 * kv_heads, head_dim)  # [1, N, H + 2KV, Dh]
        rope_(qkv[:, :, : heads + kv_heads], cos, sin)  # q and k rotated in place
        for seg in segments:
            # The new tokens' keys and values sit side by side in qkv: one copy into the cache.
            new_kv = qkv[0, seg.offset : seg.offset + seg.length, heads:].view(seg.length, 2, kv_heads, head_dim)
            seg.cache.kv[i, :, :, seg.start : seg.start + seg.length].copy_(new_kv.permute(1, 2, 0, 3))  # [2, KV, n, Dh]
        if keep_last is not None:
            if not keep_last:
                return x
            index = [seg.offset + seg.length - 1 for seg in segments]
            x, qkv = x[:, index], qkv[:, index]  # [1, B, dim], [1, B, H + 2KV, Dh]
            window = config.sliding_windows[i]
            segments = [Segment(seg.cache, seg.start + seg.length - 1, b, 1) for b, seg in enumerate(segments)]
            masks = [attention_span(seg.start, 1, window, x.device) for seg in segments]
            tokens = len(segments)

        # Attention per row: each reads only its own cache, as long as it really is (padding every row
        # to the longest would copy every cache into one tensor per layer).
        queries = qkv[0, :, :heads].transpose(0, 1)  # [H, N, Dh]
        outs = []
        for seg, (low, mask, causal) in zip(segments, masks):
            end = seg.start + seg.length
            k = seg.cache.kv[i, 0:1, :, low:end]  # [1, KV, T, Dh]
            v = seg.cache.kv[i, 1:2, :, low:end]  # [1, KV, T, Dh]
            q = queries[None, :, seg.offset : seg.offset + seg.length]  # [1, H, n, Dh]
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True))
        attn = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).transpose(1, 2).reshape(1, tokens, heads * head_dim)
        x = x + linear(attn, w.wo, w.bo)  # [1, N, dim]

        h = F.rms_norm(x, (config.dim,), w.mlp_norm, config.norm_eps)  # [1, N, dim]
        gate, up = linear(h, w.w_gate_up).chunk(2, dim=-1)  # [1, N, I] each
        return x + linear(F.silu(gate) * up, w.w_down)  # [1, N, dim]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed.is_contiguous():
            return F.embedding(ids, self.embed)  # [B, S, dim]
        # Tied to the input-major LM head [dim, vocab]: pick its columns (a lookup in the transposed
        # view would first copy the whole matrix when there is more than one token).
        return self.lm_head.index_select(1, ids.flatten()).t().reshape(*ids.shape, self.config.dim)  # [B, S, dim]

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.rms_norm(x, (self.config.dim,), self.norm, self.config.norm_eps), self.lm_head)

    # ------------------------------------------------------------------
    # Positions: RoPE tables and attention masks, built once per forward and shared by every layer

    def _rope(self, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (see rope_) for the packed tokens' positions, [1, N, 1, head_dim] each."""
        needed = max(seg.start + seg.length for seg in segments)
        if needed > self._cos.shape[0]:
            size = max(needed, 2 * self._cos.shape[0], 1024)
            # Exactly as transformers computes them: fp32 position * inv_freq, cos/sin in fp32,
            # times the attention factor, then cast to the model dtype.
            freqs = torch.arange(size, device=self.device, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
            cos = (freqs.cos() * self.config.rope_scaling).to(self.dtype)  # [positions, Dh / 2]
            sin = (freqs.sin() * self.config.rope_scaling).to(self.dtype)
            self._cos = torch.cat((cos, cos), dim=-1)  # [positions, Dh]
            self._sin = torch.cat((-sin, sin), dim=-1)
        if len(segments) == 1:
            start, end = segments[0].start, segments[0].start + segments[0].length
            return self._cos[start:end][None, :, None], self._sin[start:end][None, :, None]
        positions = torch.cat([torch.arange(seg.start, seg.start + seg.length, device=self.device) for seg in segments])  # [N]
        return self._cos[positions][None, :, None], self._sin[positions][None, :, None]

    def _masks(self, segments: list[Segment], windows: set[int | None]) -> dict:
        """Per window, per segment: (first slot attended, bool mask [n, T] or None, is_causal)."""
        return {window: [attention_span(seg.start, seg.length, window, self.device) for seg in segments] for window in windows}


class LayerSlice:
    """`Transformer.slice`: a forward for cache/buffer.py that runs some layers only, from the ids
    (layers from 0) or from a given hidden state, and returns that state too (ForwardOutput.hidden).
    Logits, if asked for, are the final norm and LM head on the slice's last hidden state."""

    def __init__(self, model: Transformer, layers: range, hidden: torch.Tensor | None = None):
        assert (hidden is None) == (layers.start == 0), "a slice from layer 0 embeds ids; a later one takes `hidden`"
        self.model, self.layers, self.hidden = model, layers, hidden

    def __call__(self, **fields: Any) -> ForwardOutput:
        batch = Batch(**fields)
        x = self.model.embedded(batch) if self.hidden is None else self.hidden  # [B, S, dim]
        x = self.model.run_layers(x, self.layers, batch)
        return ForwardOutput(self.model.head(x, batch), x)


def unpacked_rows(packed: torch.Tensor, lengths: Sequence[int], width: int) -> torch.Tensor:
    """Packed rows [sum(lengths), D] -> [len(lengths), width, D], each row right-padded with zeros."""
    if all(n == width for n in lengths):
        return packed.view(len(lengths), width, -1)
    out = packed.new_zeros(len(lengths), width, packed.shape[-1])
    out[torch.arange(width, device=packed.device)[None, :] < torch.tensor(lengths, device=packed.device)[:, None]] = packed
    return out


def attention_span(start: int, seq: int, window: int | None, device) -> tuple[int, torch.Tensor | None, bool]:
    """Which cached slots queries at positions [start, start + seq) attend to.

    Returns (low, mask, causal): keys are slots [low, start + seq); mask [seq, start + seq - low]
    (True: attend) or None; causal=True when SDPA's own causal mask is exactly right (no mask
    tensor, and the faster kernel path).
    """
    end = start + seq
    low = 0 if window is None else max(0, end - window if seq == 1 else start + 1 - window)
    if seq == 1:
        return low, None, False  # one query attends to every slot in [low, end)
    if start == 0 and (window is None or window >= seq):
        return 0, None, True  # square and top-left aligned: SDPA's is_causal is the causal mask
    key_pos = torch.arange(low, end, device=device)  # [T]
    query_pos = torch.arange(start, end, device=device)[:, None]  # [S, 1]
    mask = key_pos <= query_pos  # [S, T]
    if window is not None:
        mask &= key_pos > query_pos - window
    return low, mask, False


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x in place by RoPE in the "half" convention (transformers' rotate_half): pair i is (i, i + Dh / 2).

    x [B, S, heads, Dh]; cos [B, S, 1, Dh] = (c, c); sin [B, S, 1, Dh] = (-s, s), signed so that
    x * cos + swap_halves(x) * sin is bit for bit transformers' x * cos + rotate_half(x) * sin.
    """
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [B, S, heads, Dh]: (x2, x1)
    x.copy_(x * cos + swapped * sin)
