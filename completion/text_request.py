"""CompleteText's request: its limits, checked before the model is touched, and its cache key.

Pure checks on the request message (no torch): each broken limit raises InvalidArgument
with a message that starts with the field's name, which the service sends as INVALID_ARGUMENT.
The limits are documented on CompleteTextRequest in worker.proto.
"""

from __future__ import annotations

from .documents import CACHE_KEY_PREFIX
from .rpc import worker_pb2 as pb
from .rpc.wire import MAX_DOCUMENT_CHARS

# The LSP specification's well-known language ids ("rebase" is how its meta model spells
# git-rebase), "plaintext", and a few common ids it lacks. worker.proto lists the same set
# (a test compares them).
LSP_LANGUAGE_IDS = (
    "abap bat bibtex c clojure coffeescript cpp csharp css d dart diff dockerfile elixir erlang fsharp "
    "git-commit git-rebase go groovy handlebars haskell html ini jade java javascript javascriptreact json "
    "latex less lua makefile markdown objective-c objective-cpp pascal perl perl6 php powershell python r "
    "razor rebase ruby rust sass scala scss shaderlab shellscript sql swift tex typescript typescriptreact "
    "vb xml xsl yaml"
).split()
OTHER_LANGUAGE_IDS = "plaintext cmake jsonc julia kotlin proto svelte toml vue zig".split()
KNOWN_LANGUAGE_IDS = frozenset(LSP_LANGUAGE_IDS + OTHER_LANGUAGE_IDS)

MAX_CACHE_KEY_CHARS = 256


class InvalidArgument(ValueError):
    """A CompleteTextRequest outside its documented limits; the message starts with the field."""


def check_complete_text(request: pb.CompleteTextRequest, max_tokens_limit: int) -> None:
    text, offset = request.text, request.offset
    if not text:
        raise InvalidArgument("text: empty (there is nothing to complete)")
    if len(text) > MAX_DOCUMENT_CHARS:
        raise InvalidArgument(f"text: {len(text)} characters is over the limit of {MAX_DOCUMENT_CHARS}")
    if not 0 <= offset <= len(text):
        raise InvalidArgument(f"offset: {offset} is outside the text of {len(text)} characters (0..{len(text)})")
    if request.language_id and request.language_id not in KNOWN_LANGUAGE_IDS:
        raise InvalidArgument(
            f"language_id: unknown {request.language_id!r}; use empty for plain text or one of "
            + ", ".join(sorted(KNOWN_LANGUAGE_IDS))
        )
    options = request.options
    if not 0 <= options.max_tokens <= max_tokens_limit:
        raise InvalidArgument(
            f"options.max_tokens: {options.max_tokens} is outside 0..{max_tokens_limit} (0: the worker's default)"
        )
    if options.mode not in pb.CompletionMode.values():
        raise InvalidArgument(f"options.mode: unknown value {options.mode}")
    if options.cache not in pb.CacheMode.values():
        raise InvalidArgument(f"options.cache: unknown value {options.cache}")
    if len(request.cache_key) > MAX_CACHE_KEY_CHARS:
        raise InvalidArgument(f"cache_key: {len(request.cache_key)} characters is over the limit of {MAX_CACHE_KEY_CHARS}")


def cache_uri(cache_key: str) -> str:
    """The URI of a CompleteText cache, kept per session like a document's (documents.store_key);
    its prefix is refused from documents (empty cache_key: none is kept, the uri is only a label)."""
    return CACHE_KEY_PREFIX + cache_key
