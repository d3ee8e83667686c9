"""The precision the own forward's matrix products run in: `exact`, `fp16`, `int4`, or `auto`.

A decoding step multiplies a row or a few by every weight matrix, so it is bound by reading the
weights: smaller weights, faster steps. Three forms, all with float32 activations in and out:

- `exact`: float32 weights (the GGUF dequantised), the reference every test compares with;
- `fp16`: float16 weights, fbgemm's `linear_dynamic_fp16` (float32 activations and accumulation);
- `int4`: the GGUF's own 4-bit blocks (Q4_1: value = d * q + m, groups of 32), packed for
  `aten._weight_int4pack_mm_for_cpu`, which takes bfloat16 activations and scales. Q4_1 maps onto
  its scheme exactly: scale = d, zero = m + 8 d. Matrices stored otherwise (Q8_0, a safetensors
  folder's floats) are quantised to the same groups from their float values, min to max. The LM
  head takes fp16 (a Q8_0 matrix in the embedded model, and the one product whose error every
  token's ranking sees). The packed layout depends on the CPU's instructions, so it is made at
  every load, never cached.

`auto` measures, once per machine (the answer is kept in the cache folder, keyed by the model, the
CPU's flags, torch's build and the threads), on the threads a decoding step runs on: the products
of one decoding step (every layer's matrices, one row each, and the LM head) in each form,
and each form's deviation from `exact` on real hidden states (relative error of the products). It
takes the fastest form whose deviation is below llama.cpp's own (its Q4_1 x Q8_1 product is 5-8e-3
from the float32 one: PEER_DEVIATION, the low end), and says what it measured (`Choice.reason`).

The embedding table stays float32 whatever the precision (a lookup, not a product).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

PRECISIONS = ("exact", "fp16", "int4", "auto")
PRECISION_ENV = "ROTARY_PRECISION"
DEFAULT_PRECISION = "auto"
GROUP = 32  # int4: values per scale and zero (Q4_0/Q4_1's block)
PEER_DEVIATION = 5e-3  # llama.cpp's own relative deviation from the float32 product, the low end (issue 25)
ROUNDS = 6  # auto's timing rounds (the first warms up)

# (q [N, K] uint8 0..15, d [N, K / 32], m [N, K / 32]) of a Q4_1 matrix, by its Hugging Face name; None: not Q4_1.
Blocks = Callable[[str], Optional[tuple]]


class Fp16Weight:
    """A matrix [in, out] in float16, prepacked for fbgemm; products in float32."""

    kind = "fp16"

    def __init__(self, weight: torch.Tensor):
        self.shape = tuple(weight.shape)  # [in, out], as the float32 weight it replaces
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.t().contiguous(), None)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, in] float32 -> [R, out] float32."""
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


class Int4Weight:
    """A matrix [in, out] as 4-bit values in groups of GROUP along `in`, each group with a scale and a zero."""

    kind = "int4"

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor):
        """q [N, K] in 0..15 (N = out, K = in), d and m [N, K / GROUP]: value = d * q + m (Q4_1's form)."""
        n, k = q.shape
        self.shape = (k, n)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        # int4pack's value is (q - 8) * scale + zero: scale = d, zero = m + 8 d; [K / GROUP, N, 2], bfloat16.
        self.scales_and_zeros = torch.stack((d, m + 8 * d), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    @classmethod
    def quantized(cls, weight: torch.Tensor) -> Int4Weight:
        """A float matrix [in, out] quantised to 4 bits, per group of GROUP inputs from its min to its max."""
        rows = weight.t().contiguous().float()  # [N, K]
        groups = rows.view(rows.shape[0], -1, GROUP)
        low = groups.amin(-1, keepdim=True)
        d = (groups.amax(-1, keepdim=True) - low) / 15
        q = torch.where(d > 0, (groups - low) / d.clamp_min(1e-30), 0).round().clamp(0, 15).to(torch.uint8)
        return cls(q.view_as(rows), d.squeeze(-1), low.squeeze(-1))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, in] float32 -> [R, out] float32 (bfloat16 activations inside)."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scales_and_zeros).float()


def _int4(weight: torch.Tensor, parts: list[tuple | None]) -> Int4Weight | Fp16Weight:
    """A fused weight [in, sum of outs] in int4: from its parts' Q4_1 blocks when all have them (exact
    values), else quantised from its floats; fp16 where the kernel takes no such shape."""
    try:
        if parts and all(p is not None for p in parts):
            q, d, m = (torch.cat(items, dim=0) for items in zip(*parts))
            return Int4Weight(q, d, m)
        return Int4Weight.quantized(weight)
    except RuntimeError:  # e.g. an output count the packed layout cannot tile
        return Fp16Weight(weight)


_LAYER_PARTS = {
    "wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "wo": ("self_attn.o_proj",),
    "w_gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "w_down": ("mlp.down_proj",),
}


def pack_layer(layer: Any, index: int, precision: str, blocks: Blocks | None) -> None:
    """Replace one layer's float32 matrices (transformer.LayerWeights) by `precision`'s form, in place."""
    for field_name, parts in _LAYER_PARTS.items():
        weight = getattr(layer, field_name)
        if precision == "fp16":
            setattr(layer, field_name, Fp16Weight(weight))
        elif precision == "int4":
            found = [blocks(f"model.layers.{index}.{part}.weight") for part in parts] if blocks else []
            setattr(layer, field_name, _int4(weight, found))


def pack(model: Any, precision: str, blocks: Blocks | None = None) -> None:
    """Put a Transformer's matrices in `precision` (fp16 or int4; exact leaves them), in place. The float32
    matrices are dropped as each is replaced; the embedding table stays float32."""
    if model.precision != "exact":
        raise ValueError(f"the model is packed as {model.precision} already: pack a float32 model (load it again)")
    if precision == "exact":
        return
    if precision not in ("fp16", "int4"):
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if not model.embed.is_contiguous():  # tied: the embedding was a view of the LM head
        model.embed = model.embed.contiguous()
    for index, layer in enumerate(model.layers):
        pack_layer(layer, index, precision, blocks)
    model.lm_head = Fp16Weight(model.lm_head)
    model.precision = precision


def twin(model: Any) -> Any:
    """A shallow copy of a Transformer with layers of its own, sharing every tensor: packing the copy
    (which replaces the layers' fields) leaves the original as it is."""
    import copy

    other = copy.copy(model)
    other.layers = [type(layer)(**vars(layer)) for layer in model.layers]
    return other


def packed_copy(model: Any, precision: str, blocks: Blocks | None = None) -> Any:
    """A copy of a float32 Transformer in `precision`, the original untouched (see twin)."""
    other = twin(model)
    pack(other, precision, blocks)
    return other


@dataclass
class Choice:
    """What `choose` decided and why: per form, ms for one decoding step's products and deviation."""

    precision: str
    reason: str
    measured: dict[str, dict[str, float]] = field(default_factory=dict)


def deviation(exact: torch.Tensor, other: torch.Tensor) -> float:
    """Relative error of a product: ||other - exact|| / ||exact||."""
    return float((other.double() - exact.double()).norm() / exact.double().norm().clamp_min(1e-30))


def choose(model: Any, threads: int, blocks: Blocks | None = None, candidates: tuple[str, ...] = ("exact", "fp16", "int4")) -> Choice:
    """`auto`'s measurement (see the module's notes): the fastest form below PEER_DEVIATION, on `threads`.

    Every layer's matrices are packed in every form and timed as one decoding step reads them (one row
    through each, then the LM head): a step is bound by reading the weights, so timing one layer's
    matrices again and again would time the CPU's cache instead. Deviation: the worst relative error
    of any product on real hidden states (the embeddings of a few tokens, normed as layer 0 norms them)."""
    from .transformer import linear

    config = model.config
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (8,), generator=generator)
    hidden = F.rms_norm(model.embed[ids].float(), (config.dim,), model.layers[0].attn_norm, config.norm_eps)  # [8, dim]
    inputs = {name: hidden for name in ("wqkv", "wo", "w_gate_up")}
    inputs["w_down"] = torch.randn(8, config.intermediate_size, generator=generator) * hidden.std()
    row = {name: x[:1] for name, x in inputs.items()}
    measured: dict[str, dict[str, float]] = {}
    steps: dict[str, Callable[[], None]] = {}
    for precision in candidates:
        twin = packed_copy(model, precision, blocks)
        layers, head = twin.layers, twin.lm_head
        worst = 0.0
        if precision != "exact":
            for index in (0, len(layers) // 2, len(layers) - 1):
                for name, x in inputs.items():
                    worst = max(worst, deviation(linear(x, getattr(model.layers[index], name)), linear(x, getattr(layers[index], name))))
            worst = max(worst, deviation(linear(hidden, model.lm_head), linear(hidden, head)))
        measured[precision] = {"deviation": worst}

        def step(layers=layers, head=head) -> None:
            for layer in layers:
                for name, x in row.items():
                    linear(x, getattr(layer, name))
            linear(hidden[:1], head)

        steps[precision] = step
    # Interleaved rounds, the best of each: whatever else the machine does slows every form alike, and
    # the best round is the kernels' own speed.
    times: dict[str, list[float]] = {p: [] for p in candidates}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(ROUNDS):
            for precision in candidates:
                started = time.perf_counter()
                steps[precision]()
                times[precision].append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)
    for precision in candidates:
        measured[precision]["step_ms"] = round(min(times[precision][1:]) * 1000, 2)  # the first round warms up
    allowed = [p for p in candidates if measured[p]["deviation"] < PEER_DEVIATION]
    best = min(allowed, key=lambda p: measured[p]["step_ms"])
    summary = ", ".join(f"{p} {m['step_ms']:.1f} ms dev {m['deviation']:.1e}" for p, m in measured.items())
    return Choice(best, f"fastest below llama.cpp's deviation {PEER_DEVIATION:g} on {threads} thread(s): {summary}", measured)


def machine_key(fingerprint: str, threads: int) -> str:
    """What `auto`'s answer depends on: the model, the CPU's instructions, torch's build and the threads."""
    import hashlib
    import platform

    flags = ""
    try:
        text = open("/proc/cpuinfo").read()
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    blob = f"{fingerprint}|{platform.machine()}|{flags}|{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|{threads}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def choose_once(model: Any, threads: int, fingerprint: str, folder, blocks: Blocks | None = None) -> Choice:
    """`choose`, measured once per machine (machine_key) and kept as JSON in `folder`; later loads read it."""
    import json
    from pathlib import Path

    path = Path(folder) / f"precision-{machine_key(fingerprint, threads)}.json"
    try:
        kept = json.loads(path.read_text())
        return Choice(kept["precision"], kept["reason"] + " (measured once on this machine)", kept["measured"])
    except (OSError, ValueError, KeyError):
        pass
    choice = choose(model, threads, blocks)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"precision": choice.precision, "reason": choice.reason, "measured": choice.measured}))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache: measured again next time
    return choice


def requested(value: str | None = None) -> str:
    """The precision asked for: `value`, else $ROTARY_PRECISION, else the default; checked."""
    precision = value or os.environ.get(PRECISION_ENV) or DEFAULT_PRECISION
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision
