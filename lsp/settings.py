"""The daemon's one typed settings tree, section "rotary".

It comes from `initializationOptions` (the object itself, or {"rotary": {...}})
and from `workspace/didChangeConfiguration` ({"settings": {"rotary": {...}}}).
An invalid value warns and falls back to the default; unknown keys warn. The
editors declare the same keys and defaults (VS Code contributes.configuration,
the Neovim defaults table).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from rotary.completion.rpc.wire import COMPLETION_MODE_BY_SETTING, DECODING_MODE_BY_SETTING

# The values of completionMode and decodingMode: their settings' spellings in the one table of modes.
COMPLETION_MODES = tuple(COMPLETION_MODE_BY_SETTING)
DECODING_MODES = tuple(DECODING_MODE_BY_SETTING)


@dataclass(frozen=True)
class Settings:
    # Offer completions at all. `rotary.toggle` flips it at run time.
    enabled: bool = True
    # Address of a running worker (host:port or unix:/path). Empty: the daemon starts its own local worker.
    workerAddress: str = ""
    # Model for the daemon's own worker: a local Hugging Face directory or .gguf file. Empty: the embedded SmolLM2-135M.
    model: str = ""
    # Token budget of one completion.
    maxTokens: int = 64
    # "auto": multi-line where a block starts or on an empty line, else single-line; or always one of them.
    completionMode: str = "auto"
    # Wait this long after the last keystroke before asking the worker (a newer request cancels the older).
    debounceMs: int = 50
    # Keep each document's KV cache across edits (off: encode the context from scratch for every request).
    editAwareCache: bool = True
    # Say nothing when the suggestion is likely wrong: below this calibrated probability that its first
    # line is right, no suggestion (the status says "likely wrong"). Negative: the model's calibrated
    # threshold; 0: never abstain.
    abstainThreshold: float = -1.0
    # How tokens are decoded: "lossless" (n-gram guesses verified in one forward: the same text as
    # "plain", in fewer forwards where code repeats), "earlyExit" (lossy: easy tokens stop after fewer
    # layers, the text may differ; needs calibrated exit heads), "plain" (one token per forward).
    decodingMode: str = "lossless"
    # earlyExit's threshold: the exit controller's probability a token needs to stop early (higher:
    # fewer exits, closer to the full model). Negative: the model's calibrated threshold.
    exitThreshold: float = -1.0

    def worker_mode(self) -> str:
        """completionMode as the worker's engine names it."""
        return COMPLETION_MODE_BY_SETTING[self.completionMode].name


_LIMITS = {"maxTokens": (1, 512), "debounceMs": (0, 5000), "abstainThreshold": (-1.0, 1.0), "exitThreshold": (-1.0, 1.0)}


def parse_settings(raw: Any, base: Settings | None = None) -> tuple[Settings, list[str]]:
    """Build settings from a client's object; return them and the warnings to show."""
    base = base or Settings()
    warnings: list[str] = []
    if raw is None:
        return base, warnings
    if isinstance(raw, dict) and isinstance(raw.get("rotary"), dict):
        raw = raw["rotary"]
    if not isinstance(raw, dict):
        return base, [f"rotary settings must be an object, got {type(raw).__name__}; using defaults"]
    known = {f.name: f for f in fields(Settings)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            warnings.append(f"unknown rotary setting {key!r} ignored")
            continue
        default = getattr(Settings(), key)
        problem = _check(key, value, default)
        if problem:
            warnings.append(f"rotary.{key}: {problem}; using {default!r}")
            values[key] = default
        else:
            values[key] = float(value) if isinstance(default, float) else value
    return replace(base, **values), warnings


def _check(key: str, value: Any, default: Any) -> str | None:
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
        low, high = _LIMITS[key]
        return None if low <= value <= high else f"{value} is outside [{low}, {high}]"
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer, got {value!r}"
        low, high = _LIMITS[key]
        return None if low <= value <= high else f"{value} is outside [{low}, {high}]"
    if not isinstance(value, str):
        return f"expected a string, got {value!r}"
    if key == "completionMode" and value not in COMPLETION_MODES:
        return f"expected one of {', '.join(COMPLETION_MODES)}, got {value!r}"
    if key == "decodingMode" and value not in DECODING_MODES:
        return f"expected one of {', '.join(DECODING_MODES)}, got {value!r}"
    return None


def settings_schema() -> dict[str, dict[str, Any]]:
    """Names, types and defaults, for checking the editors' declarations against the server's."""
    out = {}
    for f in fields(Settings):
        default = getattr(Settings(), f.name)
        kind = (
            "boolean" if isinstance(default, bool) else "number" if isinstance(default, float)
            else "integer" if isinstance(default, int) else "string"
        )
        out[f.name] = {"type": kind, "default": default}
    return out
