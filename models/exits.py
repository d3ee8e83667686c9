"""Exit heads and their controller: what lets the forward stop after layer k for an easy token.

The raw "logit lens" (final norm + LM head on an intermediate hidden state) is useless on
small models: layer-l predictions rarely agree with the final ones. So each exit layer gets
a small trained adapter in front of the shared, tied LM head: h -> h + (h @ down) @ up, a
low-rank residual (rank r, 2 * dim * r parameters: the artifact stays small), fitted to map
the layer's hidden state to what the model computes from it by the end.

Deciding is cheaper than predicting: the LM head costs as much as about 8 of this model's
30 layers, so the head runs only at the exit chosen. The decision comes from a linear
controller on the hidden state (dim weights per exit layer): the probability that this
layer's head already agrees with the full model. `forward_with_exits` is the forward with
that decision in it: a plain loop over the model's layers that calls `exit_here` after each
and breaks out when it says so (the layers it skipped then get K/V by state copying).

The artifact (`save`/`load`) is a safetensors file plus a JSON header: exit layers, rank,
thresholds measured at calibration, and the identity of the model it was fitted on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .batch import Batch, ForwardOutput

log = logging.getLogger(__name__)

ARTIFACT_NAME = "rotary-exits.safetensors"
FORMAT = 1
# Artifacts shipped with Rotary (the embedded model's), named by model fingerprint.
SHIPPED = Path(__file__).resolve().parent / "calibration"


@dataclass
class ExitHeads:
    """Per exit layer: a low-rank adapter to the tied head, and a linear controller."""

    layers: tuple[int, ...]  # exit after these layers (0-based: the hidden state after layer l)
    down: dict[int, torch.Tensor]  # [dim, rank]
    up: dict[int, torch.Tensor]  # [rank, dim]
    gate_w: dict[int, torch.Tensor]  # [dim]: logit of "this layer's head agrees with the full model"
    gate_b: dict[int, torch.Tensor]  # []
    threshold: float = 0.9  # exit when the controller's probability is at least this
    meta: dict = field(default_factory=dict)  # model identity, calibration report

    def adapt(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden state the tied head reads for an exit after `layer`: [..., dim] -> [..., dim]."""
        return hidden + (hidden @ self.down[layer]) @ self.up[layer]

    def agreement(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """P(the exit head at `layer` picks the full model's token), from the hidden state: [..., dim] -> [...]."""
        return torch.sigmoid(hidden @ self.gate_w[layer] + self.gate_b[layer])

    def exit_here(self, layer: int, hidden: torch.Tensor) -> bool:
        """The exit decision for one token's hidden state [1, 1, dim] after `layer`."""
        return layer in self.gate_w and float(self.agreement(layer, hidden[0, -1])) >= self.threshold

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ExitHeads:
        move = lambda d: {k: v.to(device=device, dtype=dtype) for k, v in d.items()}  # noqa: E731
        return ExitHeads(
            self.layers, move(self.down), move(self.up), move(self.gate_w), move(self.gate_b), self.threshold, self.meta
        )

    def nbytes(self) -> int:
        return sum(t.nbytes for d in (self.down, self.up, self.gate_w, self.gate_b) for t in d.values())

    # -- the artifact -----------------------------------------------------------

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for layer in self.layers:
            tensors[f"down.{layer}"] = self.down[layer].contiguous().float()
            tensors[f"up.{layer}"] = self.up[layer].contiguous().float()
            tensors[f"gate_w.{layer}"] = self.gate_w[layer].contiguous().float()
            tensors[f"gate_b.{layer}"] = self.gate_b[layer].reshape(1).contiguous().float()
        header = {"format": str(FORMAT), "layers": json.dumps(list(self.layers)), "threshold": str(self.threshold),
                  "meta": json.dumps(self.meta)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=header)

    @classmethod
    def load(cls, path: Path) -> ExitHeads:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != str(FORMAT):
                raise ValueError(f"{path}: exit heads of format {header.get('format')!r}, this Rotary reads {FORMAT}")
            layers = tuple(json.loads(header["layers"]))
            get = lambda name: {layer: f.get_tensor(f"{name}.{layer}") for layer in layers}  # noqa: E731
            down, up, gate_w = get("down"), get("up"), get("gate_w")
            gate_b = {layer: t.reshape(()) for layer, t in get("gate_b").items()}
        return cls(layers, down, up, gate_w, gate_b, float(header["threshold"]), json.loads(header.get("meta", "{}")))


@torch.inference_mode()
def forward_with_exits(model: Any, heads: ExitHeads, batch: Batch) -> ForwardOutput:
    """The own forward (transformer.py's Transformer) for one token of one document, stopping after
    the first exit layer whose controller says its head already has the token.

    The layers skipped still get the token's K/V, computed from the exiting hidden state (norm, K/V
    projection, RoPE; no attention, no MLP: Transformer.copy_state), so every layer counts as filled.
    The logits come from that layer's exit head; `exited` says where it stopped (None: every layer ran).
    """
    assert batch.rows == 1 and batch.width == 1, "early exit decides for one token at a time"
    n_layers = model.config.n_layers
    x = model.embedded(batch)  # [1, 1, dim]
    for i in range(n_layers):
        x = model.run_layers(x, range(i, i + 1), batch)
        if i < n_layers - 1 and heads.exit_here(i, x):
            model.copy_state(x, batch, range(i + 1, n_layers))
            return ForwardOutput(model.head(heads.adapt(i, x), batch), exited=i)
    return ForwardOutput(model.head(x, batch))


class ExitingForward:
    """`forward_with_exits` as cache/buffer.py calls a forward (the Batch's fields as keywords)."""

    def __init__(self, model: Any, heads: ExitHeads):
        self.model, self.heads = model, heads

    def __call__(self, **fields: Any) -> ForwardOutput:
        return forward_with_exits(self.model, self.heads, Batch(**fields))


# What of a model's config fixes its computation. Not the whole config: each transformers release adds,
# renames or drops keys (`transformers_version`, `_model_name_or_path`, which is a path), and an artifact
# must keep fitting its model across releases and wherever the model lies on disk.
ARCHITECTURE_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "rms_norm_eps", "hidden_act",
)


def _rope_theta(config: Any) -> Any:
    """RoPE's base, wherever this transformers release keeps it (`rope_theta`, or `rope_parameters`)."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    return theta


def model_fingerprint(config: Any, tokenizer: Any, model: Any) -> str:
    """Which weights and tokenizer an artifact fits, wherever the model lies on disk and however it was
    loaded: the architecture (config: transformers' attributes), the vocabulary, and the first bytes of
    two weights (the embedding and layer 0's q projection) of `model`, a Transformer or a transformers model."""
    values = {key: getattr(config, key, None) for key in ARCHITECTURE_KEYS}
    values["rope_theta"] = _rope_theta(config)
    # floats as 6 significant digits: a GGUF's float32 1e-5 reads back as 9.999999747e-06 from one converter
    values = {key: f"{value:.6g}" if isinstance(value, float) else value for key, value in values.items()}
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    weights = hashlib.sha256()
    if hasattr(model, "layers") and hasattr(model, "embed"):  # Rotary's own forward: q is wqkv's first columns
        q_out = model.config.n_heads * model.config.head_dim
        first = (model.embed, model.layers[0].wqkv[:, :q_out].t())
    else:
        base = getattr(model, "model", model)
        first = (base.embed_tokens.weight, base.layers[0].self_attn.q_proj.weight)
    for tensor in first:
        weights.update(tensor.detach().float().contiguous().cpu().numpy().tobytes()[: 1 << 20])
    blob = json.dumps({"config": values, "vocab": vocab, "weights": weights.hexdigest()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def artifact_path(fingerprint: str) -> Path:
    """Where `rotary calibrate` writes a model's exit heads: the cache, beside the prepared models."""
    from .loader import cache_dir

    return cache_dir() / "calibration" / fingerprint / ARTIFACT_NAME


def find_exit_heads(fingerprint: str) -> tuple[ExitHeads | None, str]:
    """The model's calibrated exit heads (the user's own calibration first, then a shipped one), and where from."""
    for path in (artifact_path(fingerprint), SHIPPED / f"{fingerprint}.safetensors"):
        if path.is_file():
            try:
                return ExitHeads.load(path), str(path)
            except Exception as exc:  # a damaged or foreign artifact: run without exits, say why
                log.warning("exit heads at %s not used: %s", path, exc)
    return None, ""
