from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEXICOGRAPHIC: _ClassVar[SearchMode]
    HAMMING: _ClassVar[SearchMode]
    HYBRID: _ClassVar[SearchMode]
    PREFIX: _ClassVar[SearchMode]
LEXICOGRAPHIC: SearchMode
HAMMING: SearchMode
HYBRID: SearchMode
PREFIX: SearchMode

class Code(_message.Message):
    __slots__ = ("data", "nbits")
    DATA_FIELD_NUMBER: _ClassVar[int]
    NBITS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    nbits: int
    def __init__(self, data: _Optional[bytes] = ..., nbits: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("image", "code", "id", "k", "offset", "mode", "prefix_bits", "radius", "label_filter", "return_codes", "return_metadata", "cursor", "search_prediction_set")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BITS_FIELD_NUMBER: _ClassVar[int]
    RADIUS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FILTER_FIELD_NUMBER: _ClassVar[int]
    RETURN_CODES_FIELD_NUMBER: _ClassVar[int]
    RETURN_METADATA_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    SEARCH_PREDICTION_SET_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    code: Code
    id: int
    k: int
    offset: int
    mode: SearchMode
    prefix_bits: int
    radius: int
    label_filter: _containers.RepeatedScalarFieldContainer[str]
    return_codes: bool
    return_metadata: bool
    cursor: bytes
    search_prediction_set: bool
    def __init__(self, image: _Optional[bytes] = ..., code: _Optional[_Union[Code, _Mapping]] = ..., id: _Optional[int] = ..., k: _Optional[int] = ..., offset: _Optional[int] = ..., mode: _Optional[_Union[SearchMode, str]] = ..., prefix_bits: _Optional[int] = ..., radius: _Optional[int] = ..., label_filter: _Optional[_Iterable[str]] = ..., return_codes: _Optional[bool] = ..., return_metadata: _Optional[bool] = ..., cursor: _Optional[bytes] = ..., search_prediction_set: _Optional[bool] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "code", "hamming_distance", "common_prefix_length", "metadata", "rank")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    HAMMING_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    COMMON_PREFIX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    id: int
    code: Code
    hamming_distance: int
    common_prefix_length: int
    metadata: _struct_pb2.Struct
    rank: int
    def __init__(self, id: _Optional[int] = ..., code: _Optional[_Union[Code, _Mapping]] = ..., hamming_distance: _Optional[int] = ..., common_prefix_length: _Optional[int] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., rank: _Optional[int] = ...) -> None: ...

class ClassConfidence(_message.Message):
    __slots__ = ("index", "name", "confidence")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    confidence: float
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class QueryUncertainty(_message.Message):
    __slots__ = ("hardness", "idk", "prediction_set", "searched_prediction_set")
    HARDNESS_FIELD_NUMBER: _ClassVar[int]
    IDK_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_SET_FIELD_NUMBER: _ClassVar[int]
    SEARCHED_PREDICTION_SET_FIELD_NUMBER: _ClassVar[int]
    hardness: float
    idk: bool
    prediction_set: _containers.RepeatedCompositeFieldContainer[ClassConfidence]
    searched_prediction_set: bool
    def __init__(self, hardness: _Optional[float] = ..., idk: _Optional[bool] = ..., prediction_set: _Optional[_Iterable[_Union[ClassConfidence, _Mapping]]] = ..., searched_prediction_set: _Optional[bool] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "query_code", "next_cursor", "uncertainty")
    HITS_FIELD_NUMBER: _ClassVar[int]
    QUERY_CODE_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    query_code: Code
    next_cursor: bytes
    uncertainty: QueryUncertainty
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., query_code: _Optional[_Union[Code, _Mapping]] = ..., next_cursor: _Optional[bytes] = ..., uncertainty: _Optional[_Union[QueryUncertainty, _Mapping]] = ...) -> None: ...

class BatchSearchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SearchRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SearchRequest, _Mapping]]] = ...) -> None: ...

class BatchSearchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[SearchResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[SearchResponse, _Mapping]]] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("id", "image", "code", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: int
    image: bytes
    code: Code
    metadata: _struct_pb2.Struct
    def __init__(self, id: _Optional[int] = ..., image: _Optional[bytes] = ..., code: _Optional[_Union[Code, _Mapping]] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class AddRequest(_message.Message):
    __slots__ = ("items", "upsert", "return_codes")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    UPSERT_FIELD_NUMBER: _ClassVar[int]
    RETURN_CODES_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    upsert: bool
    return_codes: bool
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., upsert: _Optional[bool] = ..., return_codes: _Optional[bool] = ...) -> None: ...

class AddResponse(_message.Message):
    __slots__ = ("added", "codes")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    added: int
    codes: _containers.RepeatedCompositeFieldContainer[Code]
    def __init__(self, added: _Optional[int] = ..., codes: _Optional[_Iterable[_Union[Code, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("ids", "must_exist")
    IDS_FIELD_NUMBER: _ClassVar[int]
    MUST_EXIST_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    must_exist: bool
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., must_exist: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CodeLayout(_message.Message):
    __slots__ = ("nbits", "class_bits", "depth", "multilabel", "class_names", "method", "bit_order")
    NBITS_FIELD_NUMBER: _ClassVar[int]
    CLASS_BITS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    MULTILABEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BIT_ORDER_FIELD_NUMBER: _ClassVar[int]
    nbits: int
    class_bits: int
    depth: int
    multilabel: bool
    class_names: _containers.RepeatedScalarFieldContainer[str]
    method: str
    bit_order: str
    def __init__(self, nbits: _Optional[int] = ..., class_bits: _Optional[int] = ..., depth: _Optional[int] = ..., multilabel: _Optional[bool] = ..., class_names: _Optional[_Iterable[str]] = ..., method: _Optional[str] = ..., bit_order: _Optional[str] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("count", "layout", "model_content_hash", "entropy", "unique_percent", "average_collisions", "prefix_entropy", "details")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_COLLISIONS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    count: int
    layout: CodeLayout
    model_content_hash: str
    entropy: float
    unique_percent: float
    average_collisions: float
    prefix_entropy: _containers.RepeatedScalarFieldContainer[float]
    details: _struct_pb2.Struct
    def __init__(self, count: _Optional[int] = ..., layout: _Optional[_Union[CodeLayout, _Mapping]] = ..., model_content_hash: _Optional[str] = ..., entropy: _Optional[float] = ..., unique_percent: _Optional[float] = ..., average_collisions: _Optional[float] = ..., prefix_entropy: _Optional[_Iterable[float]] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class GetCodeRequest(_message.Message):
    __slots__ = ("images", "return_confidence")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RETURN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    return_confidence: bool
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., return_confidence: _Optional[bool] = ...) -> None: ...

class EncodedImage(_message.Message):
    __slots__ = ("code", "confidence")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    code: Code
    confidence: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, code: _Optional[_Union[Code, _Mapping]] = ..., confidence: _Optional[_Iterable[float]] = ...) -> None: ...

class GetCodeResponse(_message.Message):
    __slots__ = ("codes",)
    CODES_FIELD_NUMBER: _ClassVar[int]
    codes: _containers.RepeatedCompositeFieldContainer[EncodedImage]
    def __init__(self, codes: _Optional[_Iterable[_Union[EncodedImage, _Mapping]]] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
