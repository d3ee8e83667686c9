"""Read a GGUF file's weights straight into torch tensors, with Hugging Face's names.

The loader (loader.py) takes a GGUF model's config and tokenizer from a small prepared folder
and its weights from here, at every load: no dequantised copy is written to disk.

The file format (github.com/ggml-org/ggml, docs/gguf.md): a header, typed key-value metadata,
tensor descriptions (name, dims innermost first, type, offset), then the aligned tensor data.
`GGUFFile` parses the header and descriptions with `struct` (the `gguf` package's reader
builds a Python object per element of the tokenizer's 100k-entry arrays: ~20 s on a busy
machine, against ~0.1 s here) and maps the data without reading it.

`tensor()` dequantises to float32. Q4_0, Q4_1 and Q8_0 blocks are expanded with torch in a few
vectorised steps (the embedded model is Q4_1 with a Q8_0 embedding); every other type goes
through the `gguf` package's numpy dequantisers, which are llama.cpp's reference. The torch paths
give bit-identical values to those (tests/test_gguf.py compares every tensor of the embedded model).

llama.cpp's converter permutes a Llama's q and k rows (its RoPE rotates adjacent pairs, Hugging
Face's rotates halves); `hf_tensors` undoes it, as transformers' GGUF loader does, so the weights
equal what `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` holds.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Metadata value types (gguf.GGUFValueType): struct format of the scalars, 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# Tensor types (gguf.GGMLQuantizationType) read here without the gguf package: (block size, bytes a block).
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_OWN_TYPES = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34)}

# GGUF tensor names -> Hugging Face names (the Llama family: llama, mistral and qwen2 GGUFs share them).
_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class GGUFError(ValueError):
    """The file is not a GGUF this reader understands; the message says what was found."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first): the reverse of the file's dims
    type: int
    offset: int  # from the start of the file


class _Cursor:
    def __init__(self, data: memoryview):
        self.data, self.at = data, 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.data, self.at)[0]
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        text = bytes(self.data[self.at : self.at + length]).decode("utf-8", errors="replace")
        self.at += length
        return text

    def value(self, kind: int, keep: bool = True) -> Any:
        """The next value of type `kind`; keep=False skips an array (the tokenizer's 100k entries: the
        loader takes the tokenizer from its prepared folder) and returns its length only."""
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if keep:
                return [self.value(item) for _ in range(count)]
            if item == _STRING:
                data, at = self.data, self.at
                for _ in range(count):
                    at += 8 + int.from_bytes(data[at : at + 8], "little")
                self.at = at
            elif item in _SCALARS:
                self.at += count * struct.calcsize(_SCALARS[item])
            else:
                for _ in range(count):
                    self.value(item, keep=False)
            return count
        raise GGUFError(f"unknown metadata value type {kind} at byte {self.at}")


class GGUFFile:
    """A GGUF file's metadata (the tokenizer's arrays as their lengths) and tensor descriptions; tensor data
    is read on demand (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        cursor = _Cursor(memoryview(self._map))
        if bytes(self._map[:4]) != MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (it starts with {bytes(self._map[:4])!r})")
        cursor.at = 4
        self.version = cursor.unpack("<I")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} (this reader knows 2 and 3)")
        n_tensors, n_fields = cursor.unpack("<Q"), cursor.unpack("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_fields):
            key = cursor.string()
            # the tokenizer's arrays (tokens, scores, merges) are skipped: their lengths are kept
            self.metadata[key] = cursor.value(cursor.unpack("<I"), keep=not key.startswith("tokenizer.ggml."))
        described = []
        for _ in range(n_tensors):
            name = cursor.string()
            dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
            described.append((name, tuple(reversed(dims)), cursor.unpack("<I"), cursor.unpack("<Q")))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-cursor.at // alignment) * alignment
        self.tensors = {name: TensorInfo(name, shape, kind, start + offset) for name, shape, kind, offset in described}

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, dequantised to float32, in PyTorch's shape (a fresh tensor, not a view of the file)."""
        info = self.tensors[name]
        count = int(np.prod(info.shape)) if info.shape else 1
        if info.type in _OWN_TYPES:
            block, size = _OWN_TYPES[info.type]
            raw = self._map[info.offset : info.offset + count // block * size]
            return _dequantize(raw, info.type, count).reshape(info.shape)
        import gguf  # llama.cpp's reference dequantisers (numpy) for the other block types

        qtype = gguf.GGMLQuantizationType(info.type)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.asarray(self._map[info.offset : info.offset + count // block * size])
        values = gguf.quants.dequantize(raw, qtype)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape)

    def q4_1_blocks(self, name: str, n_heads: int, n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A Q4_1 matrix [N, K] as its blocks, None for another type: (q [N, K] uint8 in 0..15, d [N, K/32],
        m [N, K/32] float32), value = d * q + m; q and k rows un-permuted like hf_tensors' weights."""
        info = self.tensors[name]
        if info.type != Q4_1 or len(info.shape) != 2:
            return None
        rows, inner = info.shape
        blocks = torch.from_numpy(np.array(self._map[info.offset : info.offset + rows * inner // 32 * 20])).reshape(rows, inner // 32, 20)
        d = blocks[..., :2].contiguous().view(torch.float16).float().squeeze(-1)  # [N, K/32]
        m = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
        q = _nibbles(blocks[..., 4:].reshape(-1, 16)).reshape(rows, inner)  # [N, K]
        if self.architecture == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = n_heads if ".attn_q." in name else n_kv_heads
            q, d, m = (_reverse_permute(t, heads) for t in (q, d, m))
        return q, d, m

    def blocks_by_hf_name(self, n_heads: int, n_kv_heads: int):
        """q4_1_blocks by a weight's Hugging Face name (None where the GGUF has no such Q4_1 matrix)."""
        names = {hf_name(name): name for name in self.tensors}

        def blocks(hf: str):
            name = names.get(hf)
            return None if name is None else self.q4_1_blocks(name, n_heads, n_kv_heads)

        return blocks

    def hf_tensors(self, n_heads: int, n_kv_heads: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Every weight a Llama-family model has, with its Hugging Face name, float32 (see the module's notes)."""
        unpermute = self.architecture == "llama"
        for name in self.tensors:
            hf = hf_name(name)
            if hf is None:
                continue  # e.g. rope_freqs.weight: the loader computes RoPE from the config
            weight = self.tensor(name)
            if unpermute and name.endswith(("attn_q.weight", "attn_k.weight")):
                weight = _reverse_permute(weight, n_heads if ".attn_q." in name else n_kv_heads)
            yield hf, weight


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a Llama-family GGUF tensor, or None for one it has no counterpart of."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _LAYER_NAME.fullmatch(name)
    if match is None or match.group(2) not in _PER_LAYER:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_PER_LAYER[part]}.{kind}"


def _reverse_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py's `permute`): per head, rows
    (0, half, 1, half + 1, ...) back to (0, 1, ..., half - 1, half, ...)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape).contiguous()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """A 4-bit block's 32 values from its 16 bytes [n, 16]: value j in byte j's low nibble, j + 16 in its high."""
    nibbles = torch.empty(packed.shape[0], 32, dtype=torch.uint8)
    torch.bitwise_and(packed, 0x0F, out=nibbles[:, :16])
    torch.bitwise_right_shift(packed, 4, out=nibbles[:, 16:])
    return nibbles


def _dequantize(raw: np.ndarray, kind: int, count: int) -> torch.Tensor:
    """float32 values of `count` elements stored as `kind` in `raw` (uint8), as llama.cpp's reference does."""
    data = torch.from_numpy(np.array(raw))  # a copy: the file map stays read-only
    if kind == F32:
        return data.view(torch.float32)
    if kind == F16:
        return data.view(torch.float16).float()
    if kind == BF16:
        return data.view(torch.bfloat16).float()
    block, size = _OWN_TYPES[kind]
    blocks = data.reshape(count // block, size)
    scale = blocks[:, :2].contiguous().view(torch.float16).float()  # [n, 1]
    if kind == Q8_0:
        values = blocks[:, 2:].contiguous().view(torch.int8).float()  # [n, 32]
        return values.mul_(scale).reshape(-1)
    packed = blocks[:, 4:] if kind == Q4_1 else blocks[:, 2:]  # [n, 16]: value j in the low nibble, j + 16 in the high
    values = _nibbles(packed).float()  # in place from here on: a fresh float32 tensor costs its page faults
    if kind == Q4_0:
        return values.sub_(8).mul_(scale).reshape(-1)
    low = blocks[:, 2:4].contiguous().view(torch.float16).float()  # Q4_1's minimum, per block
    return values.mul_(scale).add_(low).reshape(-1)
