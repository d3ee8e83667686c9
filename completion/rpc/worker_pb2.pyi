from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CompletionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPLETION_MODE_AUTO: _ClassVar[CompletionMode]
    COMPLETION_MODE_SINGLE_LINE: _ClassVar[CompletionMode]
    COMPLETION_MODE_MULTI_LINE: _ClassVar[CompletionMode]

class CacheMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_MODE_EDIT_AWARE: _ClassVar[CacheMode]
    CACHE_MODE_PREFIX: _ClassVar[CacheMode]
    CACHE_MODE_NONE: _ClassVar[CacheMode]
COMPLETION_MODE_AUTO: CompletionMode
COMPLETION_MODE_SINGLE_LINE: CompletionMode
COMPLETION_MODE_MULTI_LINE: CompletionMode
CACHE_MODE_EDIT_AWARE: CacheMode
CACHE_MODE_PREFIX: CacheMode
CACHE_MODE_NONE: CacheMode

class OpenDocumentRequest(_message.Message):
    __slots__ = ("uri", "version", "language_id", "text")
    URI_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    uri: str
    version: int
    language_id: str
    text: str
    def __init__(self, uri: _Optional[str] = ..., version: _Optional[int] = ..., language_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class TextChange(_message.Message):
    __slots__ = ("start", "end", "text")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    text: str
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class EditDocumentRequest(_message.Message):
    __slots__ = ("uri", "base_version", "new_version", "changes")
    URI_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    uri: str
    base_version: int
    new_version: int
    changes: _containers.RepeatedCompositeFieldContainer[TextChange]
    def __init__(self, uri: _Optional[str] = ..., base_version: _Optional[int] = ..., new_version: _Optional[int] = ..., changes: _Optional[_Iterable[_Union[TextChange, _Mapping]]] = ...) -> None: ...

class CloseDocumentRequest(_message.Message):
    __slots__ = ("uri",)
    URI_FIELD_NUMBER: _ClassVar[int]
    uri: str
    def __init__(self, uri: _Optional[str] = ...) -> None: ...

class DocumentAck(_message.Message):
    __slots__ = ("uri", "version", "length", "crc32")
    URI_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    uri: str
    version: int
    length: int
    crc32: int
    def __init__(self, uri: _Optional[str] = ..., version: _Optional[int] = ..., length: _Optional[int] = ..., crc32: _Optional[int] = ...) -> None: ...

class CompleteOptions(_message.Message):
    __slots__ = ("max_tokens", "mode", "cache", "abstain_threshold", "early_exit", "exit_threshold", "plain_decoding")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    ABSTAIN_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EARLY_EXIT_FIELD_NUMBER: _ClassVar[int]
    EXIT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PLAIN_DECODING_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    mode: CompletionMode
    cache: CacheMode
    abstain_threshold: float
    early_exit: bool
    exit_threshold: float
    plain_decoding: bool
    def __init__(self, max_tokens: _Optional[int] = ..., mode: _Optional[_Union[CompletionMode, str]] = ..., cache: _Optional[_Union[CacheMode, str]] = ..., abstain_threshold: _Optional[float] = ..., early_exit: _Optional[bool] = ..., exit_threshold: _Optional[float] = ..., plain_decoding: _Optional[bool] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("uri", "version", "offset", "options", "request_id")
    URI_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    uri: str
    version: int
    offset: int
    options: CompleteOptions
    request_id: str
    def __init__(self, uri: _Optional[str] = ..., version: _Optional[int] = ..., offset: _Optional[int] = ..., options: _Optional[_Union[CompleteOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CompletionStats(_message.Message):
    __slots__ = ("context_tokens", "tokens_reused", "tokens_encoded", "tokens_rerotated", "stale_refreshed", "tokens_generated", "prefill_ms", "decode_ms", "total_ms", "forwards", "tokens_drafted", "drafts_accepted", "layers_run", "confidence")
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_REUSED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_ENCODED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_REROTATED_FIELD_NUMBER: _ClassVar[int]
    STALE_REFRESHED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DRAFTED_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    LAYERS_RUN_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    context_tokens: int
    tokens_reused: int
    tokens_encoded: int
    tokens_rerotated: int
    stale_refreshed: int
    tokens_generated: int
    prefill_ms: float
    decode_ms: float
    total_ms: float
    forwards: int
    tokens_drafted: int
    drafts_accepted: int
    layers_run: int
    confidence: float
    def __init__(self, context_tokens: _Optional[int] = ..., tokens_reused: _Optional[int] = ..., tokens_encoded: _Optional[int] = ..., tokens_rerotated: _Optional[int] = ..., stale_refreshed: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., prefill_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., forwards: _Optional[int] = ..., tokens_drafted: _Optional[int] = ..., drafts_accepted: _Optional[int] = ..., layers_run: _Optional[int] = ..., confidence: _Optional[float] = ...) -> None: ...

class CompletionChunk(_message.Message):
    __slots__ = ("request_id", "text", "done", "stop_reason", "stats")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    done: bool
    stop_reason: str
    stats: CompletionStats
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., done: _Optional[bool] = ..., stop_reason: _Optional[str] = ..., stats: _Optional[_Union[CompletionStats, _Mapping]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("ready", "model", "model_path", "device", "open_documents", "message", "queue_depth", "busy_seconds")
    READY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    OPEN_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    model: str
    model_path: str
    device: str
    open_documents: int
    message: str
    queue_depth: int
    busy_seconds: float
    def __init__(self, ready: _Optional[bool] = ..., model: _Optional[str] = ..., model_path: _Optional[str] = ..., device: _Optional[str] = ..., open_documents: _Optional[int] = ..., message: _Optional[str] = ..., queue_depth: _Optional[int] = ..., busy_seconds: _Optional[float] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class CompleteTextRequest(_message.Message):
    __slots__ = ("text", "offset", "language_id", "options", "cache_key", "request_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    offset: int
    language_id: str
    options: CompleteOptions
    cache_key: str
    request_id: str
    def __init__(self, text: _Optional[str] = ..., offset: _Optional[int] = ..., language_id: _Optional[str] = ..., options: _Optional[_Union[CompleteOptions, _Mapping]] = ..., cache_key: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateTestsRequest(_message.Message):
    __slots__ = ("text", "path", "language_id", "qualname", "count", "max_tokens", "drafter", "temperature", "top_p", "seed", "explain", "request_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_ID_FIELD_NUMBER: _ClassVar[int]
    QUALNAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    path: str
    language_id: str
    qualname: str
    count: int
    max_tokens: int
    drafter: str
    temperature: float
    top_p: float
    seed: int
    explain: bool
    request_id: str
    def __init__(self, text: _Optional[str] = ..., path: _Optional[str] = ..., language_id: _Optional[str] = ..., qualname: _Optional[str] = ..., count: _Optional[int] = ..., max_tokens: _Optional[int] = ..., drafter: _Optional[str] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., explain: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class PatternDraft(_message.Message):
    __slots__ = ("source", "pattern", "group", "text", "proposed", "accepted")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    source: str
    pattern: str
    group: int
    text: str
    proposed: int
    accepted: int
    def __init__(self, source: _Optional[str] = ..., pattern: _Optional[str] = ..., group: _Optional[int] = ..., text: _Optional[str] = ..., proposed: _Optional[int] = ..., accepted: _Optional[int] = ...) -> None: ...

class GeneratedTest(_message.Message):
    __slots__ = ("index", "name", "intent", "code", "syntax_ok", "syntax_error", "stop_reason", "stats", "seconds", "drafts")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    SYNTAX_OK_FIELD_NUMBER: _ClassVar[int]
    SYNTAX_ERROR_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    intent: str
    code: str
    syntax_ok: bool
    syntax_error: str
    stop_reason: str
    stats: CompletionStats
    seconds: float
    drafts: _containers.RepeatedCompositeFieldContainer[PatternDraft]
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., intent: _Optional[str] = ..., code: _Optional[str] = ..., syntax_ok: _Optional[bool] = ..., syntax_error: _Optional[str] = ..., stop_reason: _Optional[str] = ..., stats: _Optional[_Union[CompletionStats, _Mapping]] = ..., seconds: _Optional[float] = ..., drafts: _Optional[_Iterable[_Union[PatternDraft, _Mapping]]] = ...) -> None: ...

class GenerateTestsReply(_message.Message):
    __slots__ = ("request_id", "done_tests", "total_tests", "message", "test", "done", "file_text", "file_name", "language", "focal")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DONE_TESTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TESTS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FILE_TEXT_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    FOCAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    done_tests: int
    total_tests: int
    message: str
    test: GeneratedTest
    done: bool
    file_text: str
    file_name: str
    language: str
    focal: str
    def __init__(self, request_id: _Optional[str] = ..., done_tests: _Optional[int] = ..., total_tests: _Optional[int] = ..., message: _Optional[str] = ..., test: _Optional[_Union[GeneratedTest, _Mapping]] = ..., done: _Optional[bool] = ..., file_text: _Optional[str] = ..., file_name: _Optional[str] = ..., language: _Optional[str] = ..., focal: _Optional[str] = ...) -> None: ...
