from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FLOAT32: _ClassVar[DataType]
    FLOAT16: _ClassVar[DataType]
    INT8_ROW_SCALED: _ClassVar[DataType]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_INT8: _ClassVar[Encoding]
    ENCODING_FP16: _ClassVar[Encoding]
    ENCODING_FP32: _ClassVar[Encoding]
DATA_TYPE_UNSPECIFIED: DataType
FLOAT32: DataType
FLOAT16: DataType
INT8_ROW_SCALED: DataType
ENCODING_UNSPECIFIED: Encoding
ENCODING_INT8: Encoding
ENCODING_FP16: Encoding
ENCODING_FP32: Encoding

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "row_scales")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ROW_SCALES_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    row_scales: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., row_scales: _Optional[bytes] = ...) -> None: ...

class SlotDelta(_message.Message):
    __slots__ = ("slot", "a", "b")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    slot: str
    a: Tensor
    b: Tensor
    def __init__(self, slot: _Optional[str] = ..., a: _Optional[_Union[Tensor, _Mapping]] = ..., b: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class UnitMask(_message.Message):
    __slots__ = ("group", "n_units", "bits")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    N_UNITS_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    group: str
    n_units: int
    bits: bytes
    def __init__(self, group: _Optional[str] = ..., n_units: _Optional[int] = ..., bits: _Optional[bytes] = ...) -> None: ...

class DeltaBundle(_message.Message):
    __slots__ = ("bundle_id", "model_id", "base_version", "device_id", "slots", "masks", "created_at_ms", "expires_at_ms", "checksum")
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    model_id: str
    base_version: str
    device_id: str
    slots: _containers.RepeatedCompositeFieldContainer[SlotDelta]
    masks: _containers.RepeatedCompositeFieldContainer[UnitMask]
    created_at_ms: int
    expires_at_ms: int
    checksum: bytes
    def __init__(self, bundle_id: _Optional[str] = ..., model_id: _Optional[str] = ..., base_version: _Optional[str] = ..., device_id: _Optional[str] = ..., slots: _Optional[_Iterable[_Union[SlotDelta, _Mapping]]] = ..., masks: _Optional[_Iterable[_Union[UnitMask, _Mapping]]] = ..., created_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., checksum: _Optional[bytes] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model_id", "base_version", "device_id", "window", "encoding", "keep_ratio", "catalogue_window")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    KEEP_RATIO_FIELD_NUMBER: _ClassVar[int]
    CATALOGUE_WINDOW_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    base_version: str
    device_id: str
    window: _containers.RepeatedScalarFieldContainer[int]
    encoding: Encoding
    keep_ratio: float
    catalogue_window: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., base_version: _Optional[str] = ..., device_id: _Optional[str] = ..., window: _Optional[_Iterable[int]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., keep_ratio: _Optional[float] = ..., catalogue_window: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("bundle",)
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    bundle: DeltaBundle
    def __init__(self, bundle: _Optional[_Union[DeltaBundle, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_id", "version", "offset", "chunk_size")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: str
    offset: int
    chunk_size: int
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model_id", "version", "total_size", "archive_sha256", "offset", "data", "chunk_sha256")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    ARCHIVE_SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: str
    total_size: int
    archive_sha256: bytes
    offset: int
    data: bytes
    chunk_sha256: bytes
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[str] = ..., total_size: _Optional[int] = ..., archive_sha256: _Optional[bytes] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., chunk_sha256: _Optional[bytes] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "base_versions", "latest_version")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    base_versions: _containers.RepeatedScalarFieldContainer[str]
    latest_version: str
    def __init__(self, model_id: _Optional[str] = ..., base_versions: _Optional[_Iterable[str]] = ..., latest_version: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
