"""A stand-in for `rotary lsp` that speaks the same editor-facing contract, without a model.

The editor tests use it to check the plugins' own behaviour quickly and exactly
(ghost text drawn from a known suggestion, accept word/line, acceptance reports,
settings pushes); the tests marked `model` run the same scenarios against the real
server. It answers textDocument/inlineCompletion with a suggestion that depends
only on the text before the cursor:

- the item's range starts at the beginning of the word under the cursor, and its
  insertText repeats that word (so clients must handle a range that starts before
  the cursor), followed by SUGGESTION;
- with only whitespace before the cursor (column 0, or an auto-indented empty line) the
  item is INDENTED, inserted at the cursor (an empty range), like the real server's;
- a line ending in "nothing" gets no suggestion;
- a document containing "# two" gets two items (for cycling).

It records everything the editor tells it (shown/accepted reports, settings) and
returns it from `rotary.stats`, with the real server's `daemon` counters
(shown, accepted, accepted_partial, accepted_chars, settings, last_completion.text)
computed the same way, so the editor tests assert the same things against both.
"""

from __future__ import annotations

import re
import sys
import uuid

from lsprotocol import types
from pygls.lsp.server import LanguageServer

SUGGESTION = "(a, b):\n    return a + b"
SECOND = "(x):\n    pass"
INDENTED = "pass"
COMMANDS = ["rotary.stats", "rotary.restartWorker", "rotary.toggle", "rotary.suggestionShown", "rotary.suggestionAccepted"]

server = LanguageServer("rotary", "fake")
state = {
    "enabled": True,
    "settings": None,
    "initializationOptions": None,
    "shown": [],
    "accepted": [],
    "requests": 0,
    "restarts": 0,
    "worker": {"state": "ready", "address": "fake", "modelLoaded": True},
    "last_completion": None,
}


def _as_dict(arg) -> dict:
    """A command argument as pygls hands it over: a dict, or an object with attributes."""
    if isinstance(arg, dict):
        return arg
    if isinstance(arg, (list, tuple)):
        return next((d for d in map(_as_dict, arg) if d), {})
    return dict(vars(arg)) if hasattr(arg, "__dict__") else {}


def _daemon() -> dict:
    """The real server's `daemon` counters (lsp/server.py), from what the editor reported."""
    accepted = [_as_dict(a) for a in state["accepted"]]
    shown = [_as_dict(a) for a in state["shown"]]
    settings = state["settings"] or {}
    if isinstance(settings, dict) and "rotary" in settings:
        settings = settings["rotary"]
    return {
        "shown": len(shown),
        "shown_chars": sum(int(a.get("length", 0) or 0) for a in shown),
        "accepted": sum(1 for a in accepted if a.get("full", True)),
        "accepted_partial": sum(1 for a in accepted if not a.get("full", True)),
        "accepted_chars": sum(int(a.get("acceptedLength", 0) or 0) for a in accepted),
        "settings": {**(state["initializationOptions"] or {}), **(settings or {})},
        "last_completion": state["last_completion"],
    }


def status(state_name: str, message: str = "", latency=None, last=None) -> None:
    server.protocol.notify(
        "rotary/status", {"state": state_name, "message": message, "latencyMs": latency, "lastResult": last}
    )


@server.feature(types.INITIALIZE)
def initialize(params: types.InitializeParams) -> None:
    state["initializationOptions"] = params.initialization_options


@server.feature(types.INITIALIZED)
async def initialized(params: types.InitializedParams) -> None:
    status("loading", "loading model")
    token = str(uuid.uuid4())
    try:
        await server.work_done_progress.create_async(token)
        server.work_done_progress.begin(token, types.WorkDoneProgressBegin(title="Rotary", message="loading model", percentage=0))
        server.work_done_progress.report(token, types.WorkDoneProgressReport(message="loading model", percentage=50))
        server.work_done_progress.end(token, types.WorkDoneProgressEnd(message="ready"))
    except Exception as exc:  # a client without progress support
        print(f"progress failed: {exc}", file=sys.stderr)
    status("ready", "ready")


@server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
def did_change_configuration(params: types.DidChangeConfigurationParams) -> None:
    state["settings"] = params.settings


def _items(uri: str, position: types.Position) -> list[types.InlineCompletionItem]:
    doc = server.workspace.get_text_document(uri)
    line = doc.lines[position.line] if position.line < len(doc.lines) else ""
    before = line[: position.character]
    if before.rstrip().endswith("nothing"):
        return []
    word = re.search(r"\w*$", before).group(0)
    start = types.Position(line=position.line, character=position.character - len(word))
    rng = types.Range(start=start, end=position)
    texts = [INDENTED] if not before.strip() else [word + SUGGESTION]
    if "# two" in doc.source:
        texts.append(word + SECOND)
    items = []
    for text in texts:
        item_id = uuid.uuid4().hex[:12]
        items.append(
            types.InlineCompletionItem(
                insert_text=text,
                range=rng,
                command=types.Command(
                    title="accepted",
                    command="rotary.suggestionAccepted",
                    arguments=[{"id": item_id, "acceptedLength": len(text), "full": True}],
                ),
            )
        )
    return items


@server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
def inline_completion(params: types.InlineCompletionParams):
    state["requests"] += 1
    if not state["enabled"]:
        return None
    items = _items(params.text_document.uri, params.position)
    if items:
        state["last_completion"] = {"uri": params.text_document.uri, "text": items[0].insert_text}
    status("ready", "ready", 5, "suggestion" if items else "empty")
    return types.InlineCompletionList(items=items)


@server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())
def completion(params: types.CompletionParams):
    items = _items(params.text_document.uri, params.position)
    return types.CompletionList(
        is_incomplete=True,
        items=[
            types.CompletionItem(
                label=item.insert_text.splitlines()[0],
                insert_text=item.insert_text,
                kind=types.CompletionItemKind.Text,
            )
            for item in items
        ],
    )


@server.command("rotary.stats")
def stats(*args):
    return {**state, "daemon": _daemon()}


@server.command("rotary.restartWorker")
def restart_worker(*args):
    state["restarts"] += 1
    return {"restarted": True}


@server.command("rotary.toggle")
def toggle(*args):
    state["enabled"] = not state["enabled"]
    status("ready" if state["enabled"] else "disabled")
    return {"enabled": state["enabled"]}


@server.command("rotary.suggestionShown")
def suggestion_shown(*args):
    state["shown"].extend(args)
    return None


@server.command("rotary.suggestionAccepted")
def suggestion_accepted(*args):
    state["accepted"].extend(args)
    return None


if __name__ == "__main__":
    server.start_io()
