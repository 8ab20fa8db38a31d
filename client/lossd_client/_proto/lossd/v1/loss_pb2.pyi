from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class LossKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOSS_KIND_UNSPECIFIED: _ClassVar[LossKind]
    CROSS_ENTROPY: _ClassVar[LossKind]
    NLL: _ClassVar[LossKind]
    BINARY_CROSS_ENTROPY_WITH_LOGITS: _ClassVar[LossKind]
    KL_DIV: _ClassVar[LossKind]

class Reduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCTION_UNSPECIFIED: _ClassVar[Reduction]
    MEAN: _ClassVar[Reduction]
    SUM: _ClassVar[Reduction]
    NONE: _ClassVar[Reduction]
    BATCHMEAN: _ClassVar[Reduction]

class Extra(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXTRA_UNSPECIFIED: _ClassVar[Extra]
    TARGET_LOGPROB: _ClassVar[Extra]
    ENTROPY: _ClassVar[Extra]
    TARGET_RANK: _ClassVar[Extra]
    ARGMAX_CORRECT: _ClassVar[Extra]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
INT64: DType
INT32: DType
INT16: DType
INT8: DType
UINT8: DType
BOOL: DType
LOSS_KIND_UNSPECIFIED: LossKind
CROSS_ENTROPY: LossKind
NLL: LossKind
BINARY_CROSS_ENTROPY_WITH_LOGITS: LossKind
KL_DIV: LossKind
REDUCTION_UNSPECIFIED: Reduction
MEAN: Reduction
SUM: Reduction
NONE: Reduction
BATCHMEAN: Reduction
EXTRA_UNSPECIFIED: Extra
TARGET_LOGPROB: Extra
ENTROPY: Extra
TARGET_RANK: Extra
ARGMAX_CORRECT: Extra

class SharedMemoryRef(_message.Message):
    __slots__ = ("name", "offset", "length", "token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    length: int
    token: bytes
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shm")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shm: SharedMemoryRef
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shm: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class LossOptions(_message.Message):
    __slots__ = ("loss", "reduction", "ignore_index", "label_smoothing", "weight", "pos_weight", "class_axis", "shift_targets", "extras", "sequence_stats", "log_target", "size_average", "reduce")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    IGNORE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    POS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CLASS_AXIS_FIELD_NUMBER: _ClassVar[int]
    SHIFT_TARGETS_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_STATS_FIELD_NUMBER: _ClassVar[int]
    LOG_TARGET_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    loss: LossKind
    reduction: Reduction
    ignore_index: int
    label_smoothing: float
    weight: Tensor
    pos_weight: Tensor
    class_axis: int
    shift_targets: bool
    extras: _containers.RepeatedScalarFieldContainer[Extra]
    sequence_stats: bool
    log_target: bool
    size_average: bool
    reduce: bool
    def __init__(self, loss: _Optional[_Union[LossKind, str]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., ignore_index: _Optional[int] = ..., label_smoothing: _Optional[float] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., pos_weight: _Optional[_Union[Tensor, _Mapping]] = ..., class_axis: _Optional[int] = ..., shift_targets: _Optional[bool] = ..., extras: _Optional[_Iterable[_Union[Extra, str]]] = ..., sequence_stats: _Optional[bool] = ..., log_target: _Optional[bool] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("id", "input", "target", "options")
    ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    input: Tensor
    target: Tensor
    options: LossOptions
    def __init__(self, id: _Optional[str] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., options: _Optional[_Union[LossOptions, _Mapping]] = ...) -> None: ...

class SequenceStats(_message.Message):
    __slots__ = ("nll_sum", "tokens", "mean_nll", "perplexity", "is_greedy")
    NLL_SUM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_NLL_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    IS_GREEDY_FIELD_NUMBER: _ClassVar[int]
    nll_sum: _containers.RepeatedScalarFieldContainer[float]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    mean_nll: _containers.RepeatedScalarFieldContainer[float]
    perplexity: _containers.RepeatedScalarFieldContainer[float]
    is_greedy: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, nll_sum: _Optional[_Iterable[float]] = ..., tokens: _Optional[_Iterable[int]] = ..., mean_nll: _Optional[_Iterable[float]] = ..., perplexity: _Optional[_Iterable[float]] = ..., is_greedy: _Optional[_Iterable[bool]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("id", "loss", "loss_sum", "weight_sum", "counted", "sequences", "extras", "error")
    class ExtrasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUM_FIELD_NUMBER: _ClassVar[int]
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    loss: Tensor
    loss_sum: float
    weight_sum: float
    counted: int
    sequences: SequenceStats
    extras: _containers.MessageMap[str, Tensor]
    error: ItemError
    def __init__(self, id: _Optional[str] = ..., loss: _Optional[_Union[Tensor, _Mapping]] = ..., loss_sum: _Optional[float] = ..., weight_sum: _Optional[float] = ..., counted: _Optional[int] = ..., sequences: _Optional[_Union[SequenceStats, _Mapping]] = ..., extras: _Optional[_Mapping[str, Tensor]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class EvaluateBatch(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[EvaluateRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[EvaluateRequest, _Mapping]]] = ...) -> None: ...

class EvaluateBatchResults(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[EvaluateResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[EvaluateResponse, _Mapping]]] = ...) -> None: ...

class ChunkHeader(_message.Message):
    __slots__ = ("id", "options", "input_dtype", "input_shape", "target")
    ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    id: str
    options: LossOptions
    input_dtype: DType
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    target: Tensor
    def __init__(self, id: _Optional[str] = ..., options: _Optional[_Union[LossOptions, _Mapping]] = ..., input_dtype: _Optional[_Union[DType, str]] = ..., input_shape: _Optional[_Iterable[int]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EvaluateChunk(_message.Message):
    __slots__ = ("header", "input_rows", "target_rows")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    INPUT_ROWS_FIELD_NUMBER: _ClassVar[int]
    TARGET_ROWS_FIELD_NUMBER: _ClassVar[int]
    header: ChunkHeader
    input_rows: bytes
    target_rows: bytes
    def __init__(self, header: _Optional[_Union[ChunkHeader, _Mapping]] = ..., input_rows: _Optional[bytes] = ..., target_rows: _Optional[bytes] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "torch_version", "device", "max_receive_message_bytes", "max_send_message_bytes", "max_batch_rows", "max_batch_bytes", "max_wait_ms", "max_queue_requests", "max_queue_bytes", "input_dtypes", "target_dtypes", "allow_client_shm", "device_name", "max_top_k", "max_id_bytes", "max_broadcast_elements")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_RECEIVE_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEND_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPES_FIELD_NUMBER: _ClassVar[int]
    TARGET_DTYPES_FIELD_NUMBER: _ClassVar[int]
    ALLOW_CLIENT_SHM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_ID_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BROADCAST_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    version: str
    torch_version: str
    device: str
    max_receive_message_bytes: int
    max_send_message_bytes: int
    max_batch_rows: int
    max_batch_bytes: int
    max_wait_ms: float
    max_queue_requests: int
    max_queue_bytes: int
    input_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    target_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    allow_client_shm: bool
    device_name: str
    max_top_k: int
    max_id_bytes: int
    max_broadcast_elements: int
    def __init__(self, version: _Optional[str] = ..., torch_version: _Optional[str] = ..., device: _Optional[str] = ..., max_receive_message_bytes: _Optional[int] = ..., max_send_message_bytes: _Optional[int] = ..., max_batch_rows: _Optional[int] = ..., max_batch_bytes: _Optional[int] = ..., max_wait_ms: _Optional[float] = ..., max_queue_requests: _Optional[int] = ..., max_queue_bytes: _Optional[int] = ..., input_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., target_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., allow_client_shm: _Optional[bool] = ..., device_name: _Optional[str] = ..., max_top_k: _Optional[int] = ..., max_id_bytes: _Optional[int] = ..., max_broadcast_elements: _Optional[int] = ...) -> None: ...

class CompareOptions(_message.Message):
    __slots__ = ("ignore_index", "shift_targets", "top_k")
    IGNORE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHIFT_TARGETS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ignore_index: int
    shift_targets: bool
    top_k: int
    def __init__(self, ignore_index: _Optional[int] = ..., shift_targets: _Optional[bool] = ..., top_k: _Optional[int] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("id", "reference", "candidate", "target", "options")
    ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    reference: Tensor
    candidate: Tensor
    target: Tensor
    options: CompareOptions
    def __init__(self, id: _Optional[str] = ..., reference: _Optional[_Union[Tensor, _Mapping]] = ..., candidate: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., options: _Optional[_Union[CompareOptions, _Mapping]] = ...) -> None: ...

class CompareTotals(_message.Message):
    __slots__ = ("tokens", "argmax_agree", "sum_kl", "sum_kl2", "sum_nll_ref", "sum_nll_ref2", "sum_nll_cand", "sum_nll_cand2", "sum_nll_ref_nll_cand", "sum_delta_p", "sum_delta_p2", "sum_delta_p4")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_AGREE_FIELD_NUMBER: _ClassVar[int]
    SUM_KL_FIELD_NUMBER: _ClassVar[int]
    SUM_KL2_FIELD_NUMBER: _ClassVar[int]
    SUM_NLL_REF_FIELD_NUMBER: _ClassVar[int]
    SUM_NLL_REF2_FIELD_NUMBER: _ClassVar[int]
    SUM_NLL_CAND_FIELD_NUMBER: _ClassVar[int]
    SUM_NLL_CAND2_FIELD_NUMBER: _ClassVar[int]
    SUM_NLL_REF_NLL_CAND_FIELD_NUMBER: _ClassVar[int]
    SUM_DELTA_P_FIELD_NUMBER: _ClassVar[int]
    SUM_DELTA_P2_FIELD_NUMBER: _ClassVar[int]
    SUM_DELTA_P4_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    argmax_agree: int
    sum_kl: float
    sum_kl2: float
    sum_nll_ref: float
    sum_nll_ref2: float
    sum_nll_cand: float
    sum_nll_cand2: float
    sum_nll_ref_nll_cand: float
    sum_delta_p: float
    sum_delta_p2: float
    sum_delta_p4: float
    def __init__(self, tokens: _Optional[int] = ..., argmax_agree: _Optional[int] = ..., sum_kl: _Optional[float] = ..., sum_kl2: _Optional[float] = ..., sum_nll_ref: _Optional[float] = ..., sum_nll_ref2: _Optional[float] = ..., sum_nll_cand: _Optional[float] = ..., sum_nll_cand2: _Optional[float] = ..., sum_nll_ref_nll_cand: _Optional[float] = ..., sum_delta_p: _Optional[float] = ..., sum_delta_p2: _Optional[float] = ..., sum_delta_p4: _Optional[float] = ...) -> None: ...

class TopK(_message.Message):
    __slots__ = ("ids", "logprobs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    logprobs: Tensor
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., logprobs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("id", "kl", "argmax_agree", "counted", "p_ref", "p_cand", "delta_p", "nll_ref", "nll_cand", "totals", "reference_top_k", "candidate_top_k")
    ID_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_AGREE_FIELD_NUMBER: _ClassVar[int]
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    P_REF_FIELD_NUMBER: _ClassVar[int]
    P_CAND_FIELD_NUMBER: _ClassVar[int]
    DELTA_P_FIELD_NUMBER: _ClassVar[int]
    NLL_REF_FIELD_NUMBER: _ClassVar[int]
    NLL_CAND_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_TOP_K_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_TOP_K_FIELD_NUMBER: _ClassVar[int]
    id: str
    kl: Tensor
    argmax_agree: Tensor
    counted: Tensor
    p_ref: Tensor
    p_cand: Tensor
    delta_p: Tensor
    nll_ref: Tensor
    nll_cand: Tensor
    totals: CompareTotals
    reference_top_k: TopK
    candidate_top_k: TopK
    def __init__(self, id: _Optional[str] = ..., kl: _Optional[_Union[Tensor, _Mapping]] = ..., argmax_agree: _Optional[_Union[Tensor, _Mapping]] = ..., counted: _Optional[_Union[Tensor, _Mapping]] = ..., p_ref: _Optional[_Union[Tensor, _Mapping]] = ..., p_cand: _Optional[_Union[Tensor, _Mapping]] = ..., delta_p: _Optional[_Union[Tensor, _Mapping]] = ..., nll_ref: _Optional[_Union[Tensor, _Mapping]] = ..., nll_cand: _Optional[_Union[Tensor, _Mapping]] = ..., totals: _Optional[_Union[CompareTotals, _Mapping]] = ..., reference_top_k: _Optional[_Union[TopK, _Mapping]] = ..., candidate_top_k: _Optional[_Union[TopK, _Mapping]] = ...) -> None: ...

class CompareHeader(_message.Message):
    __slots__ = ("id", "options", "reference_dtype", "reference_shape", "candidate_dtype", "candidate_shape", "target")
    ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    id: str
    options: CompareOptions
    reference_dtype: DType
    reference_shape: _containers.RepeatedScalarFieldContainer[int]
    candidate_dtype: DType
    candidate_shape: _containers.RepeatedScalarFieldContainer[int]
    target: Tensor
    def __init__(self, id: _Optional[str] = ..., options: _Optional[_Union[CompareOptions, _Mapping]] = ..., reference_dtype: _Optional[_Union[DType, str]] = ..., reference_shape: _Optional[_Iterable[int]] = ..., candidate_dtype: _Optional[_Union[DType, str]] = ..., candidate_shape: _Optional[_Iterable[int]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class CompareChunk(_message.Message):
    __slots__ = ("header", "reference_rows", "candidate_rows")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ROWS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ROWS_FIELD_NUMBER: _ClassVar[int]
    header: CompareHeader
    reference_rows: bytes
    candidate_rows: bytes
    def __init__(self, header: _Optional[_Union[CompareHeader, _Mapping]] = ..., reference_rows: _Optional[bytes] = ..., candidate_rows: _Optional[bytes] = ...) -> None: ...
