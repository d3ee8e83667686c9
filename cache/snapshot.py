"""KV snapshots on disk: a document's cache written as msgpack, read back without re-encoding.

A snapshot holds the token ids, their stale intervals, the identity of the model
and tokenizer that made it, the dtype, every layer's K and V bytes, and a
SHA-256 checksum over all of it. Loading refuses (SnapshotRefused) a snapshot
from another model, dtype or tokenizer, and a corrupt or truncated one; the
caller then deletes it and rebuilds the cache by encoding.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import msgpack
import torch

from .plan import DocumentTokens

FORMAT = 1


class SnapshotRefused(Exception):
    """The snapshot cannot be used; the message says why."""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _digest(header: dict, blobs: list[bytes]) -> str:
    h = hashlib.sha256(msgpack.packb(header, use_bin_type=True))
    for blob in blobs:
        h.update(blob)
    return h.hexdigest()


def save_snapshot(path: Path, tokens: DocumentTokens, cache: Any, identity: str) -> int:
    """Write the snapshot atomically; return its size in bytes."""
    layers = [layer for layer in cache.layers if layer.is_initialized]
    dtype = str(layers[0].keys.dtype).removeprefix("torch.") if layers else "float32"
    header = {
        "format": FORMAT,
        "identity": identity,
        "dtype": dtype,
        "token_ids": list(tokens.token_ids),
        "stale": [list(iv) for iv in tokens.stale_intervals],
        "shapes": [[list(layer.keys.shape), list(layer.values.shape)] for layer in layers],
    }
    blobs = []
    for layer in layers:
        blobs += [_tensor_bytes(layer.keys), _tensor_bytes(layer.values)]
    payload = msgpack.packb({"header": header, "blobs": blobs, "sha256": _digest(header, blobs)}, use_bin_type=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(payload)
    tmp.replace(path)
    return len(payload)


def load_snapshot(path: Path, identity: str, dtype: str, new_cache: Callable[[], Any], device: str | torch.device = "cpu"):
    """Read a snapshot back into (DocumentTokens, cache); SnapshotRefused when it does not fit or is damaged."""
    try:
        data = msgpack.unpackb(path.read_bytes(), raw=False)
        header, blobs, digest = data["header"], data["blobs"], data["sha256"]
    except Exception as exc:  # truncated or not msgpack at all
        raise SnapshotRefused(f"{path.name}: unreadable ({exc.__class__.__name__})") from exc
    if _digest(header, blobs) != digest:
        raise SnapshotRefused(f"{path.name}: checksum mismatch (corrupt)")
    if header.get("format") != FORMAT:
        raise SnapshotRefused(f"{path.name}: format {header.get('format')} is not {FORMAT}")
    if header["identity"] != identity:
        raise SnapshotRefused(f"{path.name}: made by another model or tokenizer")
    if header["dtype"] != dtype:
        raise SnapshotRefused(f"{path.name}: dtype {header['dtype']} is not {dtype}")
    torch_dtype = getattr(torch, dtype)
    cache = new_cache()
    shapes = header["shapes"]
    if len(blobs) != 2 * len(shapes):
        raise SnapshotRefused(f"{path.name}: layer count does not match")
    tensors = []
    for i, (k_shape, v_shape) in enumerate(shapes):
        k = torch.frombuffer(bytearray(blobs[2 * i]), dtype=torch.uint8).view(torch_dtype).reshape(k_shape)
        v = torch.frombuffer(bytearray(blobs[2 * i + 1]), dtype=torch.uint8).view(torch_dtype).reshape(v_shape)
        tensors.append((k.to(device), v.to(device)))
    if len(cache.layers) < len(tensors):
        raise SnapshotRefused(f"{path.name}: more layers than the model has")
    for layer, (k, v) in zip(cache.layers, tensors):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    n = len(header["token_ids"])
    if tensors and tensors[0][0].shape[-2] != n:
        raise SnapshotRefused(f"{path.name}: {n} token ids but {tensors[0][0].shape[-2]} cached positions")
    tokens = DocumentTokens(header["token_ids"], stale=[tuple(iv) for iv in header["stale"]])
    return tokens, cache
