from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InitialState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INITIAL_STATE_MODEL: _ClassVar[InitialState]
    INITIAL_STATE_ZEROS: _ClassVar[InitialState]
    INITIAL_STATE_GIVEN: _ClassVar[InitialState]

class Output(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_NONE: _ClassVar[Output]
    OUTPUT_LAST: _ClassVar[Output]
    OUTPUT_ALL: _ClassVar[Output]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
INITIAL_STATE_MODEL: InitialState
INITIAL_STATE_ZEROS: InitialState
INITIAL_STATE_GIVEN: InitialState
OUTPUT_NONE: Output
OUTPUT_LAST: Output
OUTPUT_ALL: Output
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("model", "initial", "state")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    initial: InitialState
    state: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., initial: _Optional[_Union[InitialState, str]] = ..., state: _Optional[_Iterable[float]] = ...) -> None: ...

class Resume(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Frames(_message.Message):
    __slots__ = ("values", "features")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    features: int
    def __init__(self, values: _Optional[_Iterable[float]] = ..., features: _Optional[int] = ...) -> None: ...

class Feed(_message.Message):
    __slots__ = ("text", "tokens", "frames", "output", "top_k", "logits", "horizon")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: TokenIds
    frames: Frames
    output: Output
    top_k: int
    logits: bool
    horizon: int
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., frames: _Optional[_Union[Frames, _Mapping]] = ..., output: _Optional[_Union[Output, str]] = ..., top_k: _Optional[int] = ..., logits: _Optional[bool] = ..., horizon: _Optional[int] = ...) -> None: ...

class Generate(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "chunk_tokens")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    chunk_tokens: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., chunk_tokens: _Optional[int] = ...) -> None: ...

class Reset(_message.Message):
    __slots__ = ("initial", "state")
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    initial: InitialState
    state: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, initial: _Optional[_Union[InitialState, str]] = ..., state: _Optional[_Iterable[float]] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("request_id", "open", "resume", "feed", "generate", "reset", "close")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    FEED_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    open: Open
    resume: Resume
    feed: Feed
    generate: Generate
    reset: Reset
    close: Close
    def __init__(self, request_id: _Optional[int] = ..., open: _Optional[_Union[Open, _Mapping]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., feed: _Optional[_Union[Feed, _Mapping]] = ..., generate: _Optional[_Union[Generate, _Mapping]] = ..., reset: _Optional[_Union[Reset, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ...) -> None: ...

class Distribution(_message.Message):
    __slots__ = ("top_ids", "top_probs", "logits", "probs", "mean", "spread")
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_PROBS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_probs: _containers.RepeatedScalarFieldContainer[float]
    logits: _containers.RepeatedScalarFieldContainer[float]
    probs: _containers.RepeatedScalarFieldContainer[float]
    mean: _containers.RepeatedScalarFieldContainer[float]
    spread: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, top_ids: _Optional[_Iterable[int]] = ..., top_probs: _Optional[_Iterable[float]] = ..., logits: _Optional[_Iterable[float]] = ..., probs: _Optional[_Iterable[float]] = ..., mean: _Optional[_Iterable[float]] = ..., spread: _Optional[_Iterable[float]] = ...) -> None: ...

class FeedResult(_message.Message):
    __slots__ = ("fed", "distributions", "steps", "forecast")
    FED_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FORECAST_FIELD_NUMBER: _ClassVar[int]
    fed: int
    distributions: _containers.RepeatedCompositeFieldContainer[Distribution]
    steps: int
    forecast: _containers.RepeatedCompositeFieldContainer[Distribution]
    def __init__(self, fed: _Optional[int] = ..., distributions: _Optional[_Iterable[_Union[Distribution, _Mapping]]] = ..., steps: _Optional[int] = ..., forecast: _Optional[_Iterable[_Union[Distribution, _Mapping]]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "tokens", "done", "finish_reason", "steps")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    done: bool
    finish_reason: FinishReason
    steps: int
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., done: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., steps: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "cell", "vocab", "hidden_size", "state_size", "layers", "metrics", "latest", "input_kind", "features", "task", "classes", "output_size")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    cell: str
    vocab: _containers.RepeatedScalarFieldContainer[str]
    hidden_size: int
    state_size: int
    layers: int
    metrics: _containers.ScalarMap[str, float]
    latest: bool
    input_kind: str
    features: int
    task: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    output_size: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., cell: _Optional[str] = ..., vocab: _Optional[_Iterable[str]] = ..., hidden_size: _Optional[int] = ..., state_size: _Optional[int] = ..., layers: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., latest: _Optional[bool] = ..., input_kind: _Optional[str] = ..., features: _Optional[int] = ..., task: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., output_size: _Optional[int] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "model", "steps", "resumed", "idle_timeout_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: ModelInfo
    steps: int
    resumed: bool
    idle_timeout_s: int
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., steps: _Optional[int] = ..., resumed: _Optional[bool] = ..., idle_timeout_s: _Optional[int] = ...) -> None: ...

class ResetDone(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    def __init__(self, steps: _Optional[int] = ...) -> None: ...

class Closed(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("session_id", "request_id", "opened", "fed", "chunk", "reset", "closed", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    FED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: int
    opened: Opened
    fed: FeedResult
    chunk: GenerateChunk
    reset: ResetDone
    closed: Closed
    error: Error
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[int] = ..., opened: _Optional[_Union[Opened, _Mapping]] = ..., fed: _Optional[_Union[FeedResult, _Mapping]] = ..., chunk: _Optional[_Union[GenerateChunk, _Mapping]] = ..., reset: _Optional[_Union[ResetDone, _Mapping]] = ..., closed: _Optional[_Union[Closed, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("open",)
    OPEN_FIELD_NUMBER: _ClassVar[int]
    open: Open
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "feed")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FEED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    feed: Feed
    def __init__(self, session_id: _Optional[str] = ..., feed: _Optional[_Union[Feed, _Mapping]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("session_id", "result")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    result: FeedResult
    def __init__(self, session_id: _Optional[str] = ..., result: _Optional[_Union[FeedResult, _Mapping]] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SetStateRequest(_message.Message):
    __slots__ = ("session_id", "state", "logits", "steps")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    state: _containers.RepeatedScalarFieldContainer[float]
    logits: _containers.RepeatedScalarFieldContainer[float]
    steps: int
    def __init__(self, session_id: _Optional[str] = ..., state: _Optional[_Iterable[float]] = ..., logits: _Optional[_Iterable[float]] = ..., steps: _Optional[int] = ...) -> None: ...

class StateResponse(_message.Message):
    __slots__ = ("session_id", "model", "state", "steps", "logits")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: ModelRef
    state: _containers.RepeatedScalarFieldContainer[float]
    steps: int
    logits: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., state: _Optional[_Iterable[float]] = ..., steps: _Optional[int] = ..., logits: _Optional[_Iterable[float]] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
