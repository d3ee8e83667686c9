"""KV snapshots on disk: a document's cache written as msgpack, read back without re-encoding.

A snapshot holds a format version, the token ids, their stale intervals, the identity
of the model and tokenizer that made it, the dtype, the shape of the stacked K/V
([layers, 2, kv_heads, tokens, head_dim], as cache/buffer.py keeps them), their bytes,
and a SHA-256 checksum over all of it. Loading refuses (SnapshotRefused) anything that
does not fit: another format version, model, tokenizer or dtype, a corrupt or truncated
file, and a well-formed file with impossible contents (shapes that disagree with the ids
or the bytes, a layout this model does not have, stale intervals out of range). The
caller then deletes it and rebuilds the cache by encoding: a snapshot can cost time,
never a wrong answer or an error.

Snapshots hold the documents' source as token ids, so the folder is private (0700) and
every file 0600.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import msgpack
import torch

from .buffer import KVBuffer
from .plan import DocumentTokens

FORMAT = 2  # 1: per-layer tensors of a transformers DynamicCache (before Rotary owned its cache)
MAX_SNAPSHOT_BYTES = 8 << 30  # a header claiming more than this is refused before anything is allocated


class SnapshotRefused(Exception):
    """The snapshot cannot be used; the message says why."""


def _digest(header: dict, blob: bytes) -> str:
    h = hashlib.sha256(msgpack.packb(header, use_bin_type=True))
    h.update(blob)
    return h.hexdigest()


def private_folder(path: Path) -> None:
    """Create `path` (and parents) readable by this user alone; tighten it if it exists."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def save_snapshot(path: Path, buffer: KVBuffer, identity: str) -> int:
    """Write the buffer's tokens and K/V atomically, private to this user; return the size in bytes."""
    kv = buffer.used()  # [layers, 2, kv_heads, tokens, head_dim]
    header = {
        "format": FORMAT,
        "identity": identity,
        "dtype": str(kv.dtype).removeprefix("torch."),
        "token_ids": list(buffer.token_ids),
        "stale": [list(iv) for iv in buffer.tokens.stale_intervals],
        "shape": list(kv.shape),
    }
    blob = kv.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    payload = msgpack.packb({"header": header, "blob": blob, "sha256": _digest(header, blob)}, use_bin_type=True)
    private_folder(path.parent)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(payload)


def load_snapshot(
    path: Path, identity: str, dtype: str, layout: Sequence[int], device: str | torch.device = "cpu"
) -> KVBuffer:
    """Read a snapshot back into a KVBuffer; SnapshotRefused when it does not fit or is damaged.

    layout: (layers, kv_heads, head_dim) of the model now loaded.
    """
    name = path.name
    try:
        if path.stat().st_size > MAX_SNAPSHOT_BYTES:
            raise SnapshotRefused(f"{name}: larger than {MAX_SNAPSHOT_BYTES >> 30} GiB")
        data = msgpack.unpackb(path.read_bytes(), raw=False)
        header, blob, digest = data["header"], data["blob"], data["sha256"]
        if not isinstance(header, dict) or not isinstance(blob, bytes):
            raise TypeError("header or blob of the wrong type")
    except SnapshotRefused:
        raise
    except Exception as exc:  # truncated, not msgpack, an older format's keys, a missing key
        raise SnapshotRefused(f"{name}: unreadable ({exc.__class__.__name__}: {exc})") from exc
    if header.get("format") != FORMAT:
        raise SnapshotRefused(f"{name}: format {header.get('format')!r}, this Rotary reads format {FORMAT}")
    if _digest(header, blob) != digest:
        raise SnapshotRefused(f"{name}: checksum mismatch (corrupt)")
    if header.get("identity") != identity:
        raise SnapshotRefused(f"{name}: made by another model or tokenizer")
    if header.get("dtype") != dtype:
        raise SnapshotRefused(f"{name}: dtype {header.get('dtype')!r} is not {dtype}")
    try:
        token_ids = [int(i) for i in header["token_ids"]]
        stale = [(int(s), int(e)) for s, e in header["stale"]]
        shape = [int(n) for n in header["shape"]]
        torch_dtype = getattr(torch, dtype)
        layers, kv_heads, head_dim = (int(n) for n in layout)
        if shape != [layers, 2, kv_heads, len(token_ids), head_dim]:
            raise ValueError(f"shape {shape} does not fit {len(token_ids)} tokens of a {layout} model")
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        if len(blob) != itemsize * layers * 2 * kv_heads * len(token_ids) * head_dim:
            raise ValueError(f"{len(blob)} bytes for shape {shape}")
        if any(not (0 <= s < e <= len(token_ids)) for s, e in stale):
            raise ValueError("stale interval outside the tokens")
        tokens = DocumentTokens(token_ids, stale=stale)
        kv = torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(torch_dtype).reshape(shape).to(device)
        return KVBuffer.from_kv(kv, tokens)
    except Exception as exc:  # well-formed msgpack with impossible contents
        raise SnapshotRefused(f"{name}: inconsistent contents ({exc})") from exc
