from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetricsResponse(_message.Message):
    __slots__ = ("slot_id", "prompt_json_for_slot", "tokens_per_second", "tokens_generated", "prompt_tokens_processed")
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_JSON_FOR_SLOT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    slot_id: int
    prompt_json_for_slot: str
    tokens_per_second: float
    tokens_generated: int
    prompt_tokens_processed: int
    def __init__(self, slot_id: _Optional[int] = ..., prompt_json_for_slot: _Optional[str] = ..., tokens_per_second: _Optional[float] = ..., tokens_generated: _Optional[int] = ..., prompt_tokens_processed: _Optional[int] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("query", "documents", "top_n")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    top_n: int
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ..., top_n: _Optional[int] = ...) -> None: ...

class RerankResult(_message.Message):
    __slots__ = ("usage", "results")
    USAGE_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    usage: Usage
    results: _containers.RepeatedCompositeFieldContainer[DocumentResult]
    def __init__(self, usage: _Optional[_Union[Usage, _Mapping]] = ..., results: _Optional[_Iterable[_Union[DocumentResult, _Mapping]]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("total_tokens", "prompt_tokens")
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    total_tokens: int
    prompt_tokens: int
    def __init__(self, total_tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class DocumentResult(_message.Message):
    __slots__ = ("index", "text", "relevance_score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    relevance_score: float
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., relevance_score: _Optional[float] = ...) -> None: ...

class StoresKey(_message.Message):
    __slots__ = ("Floats",)
    FLOATS_FIELD_NUMBER: _ClassVar[int]
    Floats: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, Floats: _Optional[_Iterable[float]] = ...) -> None: ...

class StoresValue(_message.Message):
    __slots__ = ("Bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    Bytes: bytes
    def __init__(self, Bytes: _Optional[bytes] = ...) -> None: ...

class StoresSetOptions(_message.Message):
    __slots__ = ("Keys", "Values")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    Keys: _containers.RepeatedCompositeFieldContainer[StoresKey]
    Values: _containers.RepeatedCompositeFieldContainer[StoresValue]
    def __init__(self, Keys: _Optional[_Iterable[_Union[StoresKey, _Mapping]]] = ..., Values: _Optional[_Iterable[_Union[StoresValue, _Mapping]]] = ...) -> None: ...

class StoresDeleteOptions(_message.Message):
    __slots__ = ("Keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    Keys: _containers.RepeatedCompositeFieldContainer[StoresKey]
    def __init__(self, Keys: _Optional[_Iterable[_Union[StoresKey, _Mapping]]] = ...) -> None: ...

class StoresGetOptions(_message.Message):
    __slots__ = ("Keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    Keys: _containers.RepeatedCompositeFieldContainer[StoresKey]
    def __init__(self, Keys: _Optional[_Iterable[_Union[StoresKey, _Mapping]]] = ...) -> None: ...

class StoresGetResult(_message.Message):
    __slots__ = ("Keys", "Values")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    Keys: _containers.RepeatedCompositeFieldContainer[StoresKey]
    Values: _containers.RepeatedCompositeFieldContainer[StoresValue]
    def __init__(self, Keys: _Optional[_Iterable[_Union[StoresKey, _Mapping]]] = ..., Values: _Optional[_Iterable[_Union[StoresValue, _Mapping]]] = ...) -> None: ...

class StoresFindOptions(_message.Message):
    __slots__ = ("Key", "TopK")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    Key: StoresKey
    TopK: int
    def __init__(self, Key: _Optional[_Union[StoresKey, _Mapping]] = ..., TopK: _Optional[int] = ...) -> None: ...

class StoresFindResult(_message.Message):
    __slots__ = ("Keys", "Values", "Similarities")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SIMILARITIES_FIELD_NUMBER: _ClassVar[int]
    Keys: _containers.RepeatedCompositeFieldContainer[StoresKey]
    Values: _containers.RepeatedCompositeFieldContainer[StoresValue]
    Similarities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, Keys: _Optional[_Iterable[_Union[StoresKey, _Mapping]]] = ..., Values: _Optional[_Iterable[_Union[StoresValue, _Mapping]]] = ..., Similarities: _Optional[_Iterable[float]] = ...) -> None: ...

class HealthMessage(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PredictOptions(_message.Message):
    __slots__ = ("Prompt", "Seed", "Threads", "Tokens", "TopK", "Repeat", "Batch", "NKeep", "Temperature", "Penalty", "F16KV", "DebugMode", "StopPrompts", "IgnoreEOS", "TailFreeSamplingZ", "TypicalP", "FrequencyPenalty", "PresencePenalty", "Mirostat", "MirostatETA", "MirostatTAU", "PenalizeNL", "LogitBias", "MLock", "MMap", "PromptCacheAll", "PromptCacheRO", "Grammar", "MainGPU", "TensorSplit", "TopP", "PromptCachePath", "Debug", "EmbeddingTokens", "Embeddings", "RopeFreqBase", "RopeFreqScale", "NegativePromptScale", "NegativePrompt", "NDraft", "Images", "UseTokenizerTemplate", "Messages", "Videos", "Audios", "CorrelationId", "Tools", "ToolChoice", "Logprobs", "TopLogprobs", "Metadata", "MinP")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    REPEAT_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    NKEEP_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    PENALTY_FIELD_NUMBER: _ClassVar[int]
    F16KV_FIELD_NUMBER: _ClassVar[int]
    DEBUGMODE_FIELD_NUMBER: _ClassVar[int]
    STOPPROMPTS_FIELD_NUMBER: _ClassVar[int]
    IGNOREEOS_FIELD_NUMBER: _ClassVar[int]
    TAILFREESAMPLINGZ_FIELD_NUMBER: _ClassVar[int]
    TYPICALP_FIELD_NUMBER: _ClassVar[int]
    FREQUENCYPENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCEPENALTY_FIELD_NUMBER: _ClassVar[int]
    MIROSTAT_FIELD_NUMBER: _ClassVar[int]
    MIROSTATETA_FIELD_NUMBER: _ClassVar[int]
    MIROSTATTAU_FIELD_NUMBER: _ClassVar[int]
    PENALIZENL_FIELD_NUMBER: _ClassVar[int]
    LOGITBIAS_FIELD_NUMBER: _ClassVar[int]
    MLOCK_FIELD_NUMBER: _ClassVar[int]
    MMAP_FIELD_NUMBER: _ClassVar[int]
    PROMPTCACHEALL_FIELD_NUMBER: _ClassVar[int]
    PROMPTCACHERO_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    MAINGPU_FIELD_NUMBER: _ClassVar[int]
    TENSORSPLIT_FIELD_NUMBER: _ClassVar[int]
    TOPP_FIELD_NUMBER: _ClassVar[int]
    PROMPTCACHEPATH_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGTOKENS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    ROPEFREQBASE_FIELD_NUMBER: _ClassVar[int]
    ROPEFREQSCALE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVEPROMPTSCALE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVEPROMPT_FIELD_NUMBER: _ClassVar[int]
    NDRAFT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    USETOKENIZERTEMPLATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    VIDEOS_FIELD_NUMBER: _ClassVar[int]
    AUDIOS_FIELD_NUMBER: _ClassVar[int]
    CORRELATIONID_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    TOOLCHOICE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOPLOGPROBS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    MINP_FIELD_NUMBER: _ClassVar[int]
    Prompt: str
    Seed: int
    Threads: int
    Tokens: int
    TopK: int
    Repeat: int
    Batch: int
    NKeep: int
    Temperature: float
    Penalty: float
    F16KV: bool
    DebugMode: bool
    StopPrompts: _containers.RepeatedScalarFieldContainer[str]
    IgnoreEOS: bool
    TailFreeSamplingZ: float
    TypicalP: float
    FrequencyPenalty: float
    PresencePenalty: float
    Mirostat: int
    MirostatETA: float
    MirostatTAU: float
    PenalizeNL: bool
    LogitBias: str
    MLock: bool
    MMap: bool
    PromptCacheAll: bool
    PromptCacheRO: bool
    Grammar: str
    MainGPU: str
    TensorSplit: str
    TopP: float
    PromptCachePath: str
    Debug: bool
    EmbeddingTokens: _containers.RepeatedScalarFieldContainer[int]
    Embeddings: str
    RopeFreqBase: float
    RopeFreqScale: float
    NegativePromptScale: float
    NegativePrompt: str
    NDraft: int
    Images: _containers.RepeatedScalarFieldContainer[str]
    UseTokenizerTemplate: bool
    Messages: _containers.RepeatedCompositeFieldContainer[Message]
    Videos: _containers.RepeatedScalarFieldContainer[str]
    Audios: _containers.RepeatedScalarFieldContainer[str]
    CorrelationId: str
    Tools: str
    ToolChoice: str
    Logprobs: int
    TopLogprobs: int
    Metadata: _containers.ScalarMap[str, str]
    MinP: float
    def __init__(self, Prompt: _Optional[str] = ..., Seed: _Optional[int] = ..., Threads: _Optional[int] = ..., Tokens: _Optional[int] = ..., TopK: _Optional[int] = ..., Repeat: _Optional[int] = ..., Batch: _Optional[int] = ..., NKeep: _Optional[int] = ..., Temperature: _Optional[float] = ..., Penalty: _Optional[float] = ..., F16KV: _Optional[bool] = ..., DebugMode: _Optional[bool] = ..., StopPrompts: _Optional[_Iterable[str]] = ..., IgnoreEOS: _Optional[bool] = ..., TailFreeSamplingZ: _Optional[float] = ..., TypicalP: _Optional[float] = ..., FrequencyPenalty: _Optional[float] = ..., PresencePenalty: _Optional[float] = ..., Mirostat: _Optional[int] = ..., MirostatETA: _Optional[float] = ..., MirostatTAU: _Optional[float] = ..., PenalizeNL: _Optional[bool] = ..., LogitBias: _Optional[str] = ..., MLock: _Optional[bool] = ..., MMap: _Optional[bool] = ..., PromptCacheAll: _Optional[bool] = ..., PromptCacheRO: _Optional[bool] = ..., Grammar: _Optional[str] = ..., MainGPU: _Optional[str] = ..., TensorSplit: _Optional[str] = ..., TopP: _Optional[float] = ..., PromptCachePath: _Optional[str] = ..., Debug: _Optional[bool] = ..., EmbeddingTokens: _Optional[_Iterable[int]] = ..., Embeddings: _Optional[str] = ..., RopeFreqBase: _Optional[float] = ..., RopeFreqScale: _Optional[float] = ..., NegativePromptScale: _Optional[float] = ..., NegativePrompt: _Optional[str] = ..., NDraft: _Optional[int] = ..., Images: _Optional[_Iterable[str]] = ..., UseTokenizerTemplate: _Optional[bool] = ..., Messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., Videos: _Optional[_Iterable[str]] = ..., Audios: _Optional[_Iterable[str]] = ..., CorrelationId: _Optional[str] = ..., Tools: _Optional[str] = ..., ToolChoice: _Optional[str] = ..., Logprobs: _Optional[int] = ..., TopLogprobs: _Optional[int] = ..., Metadata: _Optional[_Mapping[str, str]] = ..., MinP: _Optional[float] = ...) -> None: ...

class ToolCallDelta(_message.Message):
    __slots__ = ("index", "id", "name", "arguments")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    name: str
    arguments: str
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., name: _Optional[str] = ..., arguments: _Optional[str] = ...) -> None: ...

class ChatDelta(_message.Message):
    __slots__ = ("content", "reasoning_content", "tool_calls")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    REASONING_CONTENT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    content: str
    reasoning_content: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCallDelta]
    def __init__(self, content: _Optional[str] = ..., reasoning_content: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCallDelta, _Mapping]]] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("message", "tokens", "prompt_tokens", "timing_prompt_processing", "timing_token_generation", "audio", "logprobs", "chat_deltas")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMING_PROMPT_PROCESSING_FIELD_NUMBER: _ClassVar[int]
    TIMING_TOKEN_GENERATION_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CHAT_DELTAS_FIELD_NUMBER: _ClassVar[int]
    message: bytes
    tokens: int
    prompt_tokens: int
    timing_prompt_processing: float
    timing_token_generation: float
    audio: bytes
    logprobs: bytes
    chat_deltas: _containers.RepeatedCompositeFieldContainer[ChatDelta]
    def __init__(self, message: _Optional[bytes] = ..., tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., timing_prompt_processing: _Optional[float] = ..., timing_token_generation: _Optional[float] = ..., audio: _Optional[bytes] = ..., logprobs: _Optional[bytes] = ..., chat_deltas: _Optional[_Iterable[_Union[ChatDelta, _Mapping]]] = ...) -> None: ...

class GrammarTrigger(_message.Message):
    __slots__ = ("word",)
    WORD_FIELD_NUMBER: _ClassVar[int]
    word: str
    def __init__(self, word: _Optional[str] = ...) -> None: ...

class ModelOptions(_message.Message):
    __slots__ = ("Model", "ContextSize", "Seed", "NBatch", "F16Memory", "MLock", "MMap", "VocabOnly", "LowVRAM", "Embeddings", "NUMA", "NGPULayers", "MainGPU", "TensorSplit", "Threads", "RopeFreqBase", "RopeFreqScale", "RMSNormEps", "NGQA", "ModelFile", "PipelineType", "SchedulerType", "CUDA", "CFGScale", "IMG2IMG", "CLIPModel", "CLIPSubfolder", "CLIPSkip", "ControlNet", "Tokenizer", "LoraBase", "LoraAdapter", "LoraScale", "NoMulMatQ", "DraftModel", "AudioPath", "Quantization", "GPUMemoryUtilization", "TrustRemoteCode", "EnforceEager", "SwapSpace", "MaxModelLen", "TensorParallelSize", "LoadFormat", "DisableLogStatus", "DType", "LimitImagePerPrompt", "LimitVideoPerPrompt", "LimitAudioPerPrompt", "MMProj", "RopeScaling", "YarnExtFactor", "YarnAttnFactor", "YarnBetaFast", "YarnBetaSlow", "Type", "FlashAttention", "NoKVOffload", "ModelPath", "LoraAdapters", "LoraScales", "Options", "CacheTypeKey", "CacheTypeValue", "GrammarTriggers", "Reranking", "Overrides")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXTSIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NBATCH_FIELD_NUMBER: _ClassVar[int]
    F16MEMORY_FIELD_NUMBER: _ClassVar[int]
    MLOCK_FIELD_NUMBER: _ClassVar[int]
    MMAP_FIELD_NUMBER: _ClassVar[int]
    VOCABONLY_FIELD_NUMBER: _ClassVar[int]
    LOWVRAM_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    NUMA_FIELD_NUMBER: _ClassVar[int]
    NGPULAYERS_FIELD_NUMBER: _ClassVar[int]
    MAINGPU_FIELD_NUMBER: _ClassVar[int]
    TENSORSPLIT_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    ROPEFREQBASE_FIELD_NUMBER: _ClassVar[int]
    ROPEFREQSCALE_FIELD_NUMBER: _ClassVar[int]
    RMSNORMEPS_FIELD_NUMBER: _ClassVar[int]
    NGQA_FIELD_NUMBER: _ClassVar[int]
    MODELFILE_FIELD_NUMBER: _ClassVar[int]
    PIPELINETYPE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULERTYPE_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    CFGSCALE_FIELD_NUMBER: _ClassVar[int]
    IMG2IMG_FIELD_NUMBER: _ClassVar[int]
    CLIPMODEL_FIELD_NUMBER: _ClassVar[int]
    CLIPSUBFOLDER_FIELD_NUMBER: _ClassVar[int]
    CLIPSKIP_FIELD_NUMBER: _ClassVar[int]
    CONTROLNET_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    LORABASE_FIELD_NUMBER: _ClassVar[int]
    LORAADAPTER_FIELD_NUMBER: _ClassVar[int]
    LORASCALE_FIELD_NUMBER: _ClassVar[int]
    NOMULMATQ_FIELD_NUMBER: _ClassVar[int]
    DRAFTMODEL_FIELD_NUMBER: _ClassVar[int]
    AUDIOPATH_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    GPUMEMORYUTILIZATION_FIELD_NUMBER: _ClassVar[int]
    TRUSTREMOTECODE_FIELD_NUMBER: _ClassVar[int]
    ENFORCEEAGER_FIELD_NUMBER: _ClassVar[int]
    SWAPSPACE_FIELD_NUMBER: _ClassVar[int]
    MAXMODELLEN_FIELD_NUMBER: _ClassVar[int]
    TENSORPARALLELSIZE_FIELD_NUMBER: _ClassVar[int]
    LOADFORMAT_FIELD_NUMBER: _ClassVar[int]
    DISABLELOGSTATUS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LIMITIMAGEPERPROMPT_FIELD_NUMBER: _ClassVar[int]
    LIMITVIDEOPERPROMPT_FIELD_NUMBER: _ClassVar[int]
    LIMITAUDIOPERPROMPT_FIELD_NUMBER: _ClassVar[int]
    MMPROJ_FIELD_NUMBER: _ClassVar[int]
    ROPESCALING_FIELD_NUMBER: _ClassVar[int]
    YARNEXTFACTOR_FIELD_NUMBER: _ClassVar[int]
    YARNATTNFACTOR_FIELD_NUMBER: _ClassVar[int]
    YARNBETAFAST_FIELD_NUMBER: _ClassVar[int]
    YARNBETASLOW_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    FLASHATTENTION_FIELD_NUMBER: _ClassVar[int]
    NOKVOFFLOAD_FIELD_NUMBER: _ClassVar[int]
    MODELPATH_FIELD_NUMBER: _ClassVar[int]
    LORAADAPTERS_FIELD_NUMBER: _ClassVar[int]
    LORASCALES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CACHETYPEKEY_FIELD_NUMBER: _ClassVar[int]
    CACHETYPEVALUE_FIELD_NUMBER: _ClassVar[int]
    GRAMMARTRIGGERS_FIELD_NUMBER: _ClassVar[int]
    RERANKING_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    Model: str
    ContextSize: int
    Seed: int
    NBatch: int
    F16Memory: bool
    MLock: bool
    MMap: bool
    VocabOnly: bool
    LowVRAM: bool
    Embeddings: bool
    NUMA: bool
    NGPULayers: int
    MainGPU: str
    TensorSplit: str
    Threads: int
    RopeFreqBase: float
    RopeFreqScale: float
    RMSNormEps: float
    NGQA: int
    ModelFile: str
    PipelineType: str
    SchedulerType: str
    CUDA: bool
    CFGScale: float
    IMG2IMG: bool
    CLIPModel: str
    CLIPSubfolder: str
    CLIPSkip: int
    ControlNet: str
    Tokenizer: str
    LoraBase: str
    LoraAdapter: str
    LoraScale: float
    NoMulMatQ: bool
    DraftModel: str
    AudioPath: str
    Quantization: str
    GPUMemoryUtilization: float
    TrustRemoteCode: bool
    EnforceEager: bool
    SwapSpace: int
    MaxModelLen: int
    TensorParallelSize: int
    LoadFormat: str
    DisableLogStatus: bool
    DType: str
    LimitImagePerPrompt: int
    LimitVideoPerPrompt: int
    LimitAudioPerPrompt: int
    MMProj: str
    RopeScaling: str
    YarnExtFactor: float
    YarnAttnFactor: float
    YarnBetaFast: float
    YarnBetaSlow: float
    Type: str
    FlashAttention: str
    NoKVOffload: bool
    ModelPath: str
    LoraAdapters: _containers.RepeatedScalarFieldContainer[str]
    LoraScales: _containers.RepeatedScalarFieldContainer[float]
    Options: _containers.RepeatedScalarFieldContainer[str]
    CacheTypeKey: str
    CacheTypeValue: str
    GrammarTriggers: _containers.RepeatedCompositeFieldContainer[GrammarTrigger]
    Reranking: bool
    Overrides: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, Model: _Optional[str] = ..., ContextSize: _Optional[int] = ..., Seed: _Optional[int] = ..., NBatch: _Optional[int] = ..., F16Memory: _Optional[bool] = ..., MLock: _Optional[bool] = ..., MMap: _Optional[bool] = ..., VocabOnly: _Optional[bool] = ..., LowVRAM: _Optional[bool] = ..., Embeddings: _Optional[bool] = ..., NUMA: _Optional[bool] = ..., NGPULayers: _Optional[int] = ..., MainGPU: _Optional[str] = ..., TensorSplit: _Optional[str] = ..., Threads: _Optional[int] = ..., RopeFreqBase: _Optional[float] = ..., RopeFreqScale: _Optional[float] = ..., RMSNormEps: _Optional[float] = ..., NGQA: _Optional[int] = ..., ModelFile: _Optional[str] = ..., PipelineType: _Optional[str] = ..., SchedulerType: _Optional[str] = ..., CUDA: _Optional[bool] = ..., CFGScale: _Optional[float] = ..., IMG2IMG: _Optional[bool] = ..., CLIPModel: _Optional[str] = ..., CLIPSubfolder: _Optional[str] = ..., CLIPSkip: _Optional[int] = ..., ControlNet: _Optional[str] = ..., Tokenizer: _Optional[str] = ..., LoraBase: _Optional[str] = ..., LoraAdapter: _Optional[str] = ..., LoraScale: _Optional[float] = ..., NoMulMatQ: _Optional[bool] = ..., DraftModel: _Optional[str] = ..., AudioPath: _Optional[str] = ..., Quantization: _Optional[str] = ..., GPUMemoryUtilization: _Optional[float] = ..., TrustRemoteCode: _Optional[bool] = ..., EnforceEager: _Optional[bool] = ..., SwapSpace: _Optional[int] = ..., MaxModelLen: _Optional[int] = ..., TensorParallelSize: _Optional[int] = ..., LoadFormat: _Optional[str] = ..., DisableLogStatus: _Optional[bool] = ..., DType: _Optional[str] = ..., LimitImagePerPrompt: _Optional[int] = ..., LimitVideoPerPrompt: _Optional[int] = ..., LimitAudioPerPrompt: _Optional[int] = ..., MMProj: _Optional[str] = ..., RopeScaling: _Optional[str] = ..., YarnExtFactor: _Optional[float] = ..., YarnAttnFactor: _Optional[float] = ..., YarnBetaFast: _Optional[float] = ..., YarnBetaSlow: _Optional[float] = ..., Type: _Optional[str] = ..., FlashAttention: _Optional[str] = ..., NoKVOffload: _Optional[bool] = ..., ModelPath: _Optional[str] = ..., LoraAdapters: _Optional[_Iterable[str]] = ..., LoraScales: _Optional[_Iterable[float]] = ..., Options: _Optional[_Iterable[str]] = ..., CacheTypeKey: _Optional[str] = ..., CacheTypeValue: _Optional[str] = ..., GrammarTriggers: _Optional[_Iterable[_Union[GrammarTrigger, _Mapping]]] = ..., Reranking: _Optional[bool] = ..., Overrides: _Optional[_Iterable[str]] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("message", "success")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    message: str
    success: bool
    def __init__(self, message: _Optional[str] = ..., success: _Optional[bool] = ...) -> None: ...

class EmbeddingResult(_message.Message):
    __slots__ = ("embeddings",)
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, embeddings: _Optional[_Iterable[float]] = ...) -> None: ...

class TranscriptRequest(_message.Message):
    __slots__ = ("dst", "language", "threads", "translate", "diarize", "prompt", "temperature", "timestamp_granularities", "stream")
    DST_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    TRANSLATE_FIELD_NUMBER: _ClassVar[int]
    DIARIZE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_GRANULARITIES_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    dst: str
    language: str
    threads: int
    translate: bool
    diarize: bool
    prompt: str
    temperature: float
    timestamp_granularities: _containers.RepeatedScalarFieldContainer[str]
    stream: bool
    def __init__(self, dst: _Optional[str] = ..., language: _Optional[str] = ..., threads: _Optional[int] = ..., translate: _Optional[bool] = ..., diarize: _Optional[bool] = ..., prompt: _Optional[str] = ..., temperature: _Optional[float] = ..., timestamp_granularities: _Optional[_Iterable[str]] = ..., stream: _Optional[bool] = ...) -> None: ...

class TranscriptResult(_message.Message):
    __slots__ = ("segments", "text", "language", "duration")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[TranscriptSegment]
    text: str
    language: str
    duration: float
    def __init__(self, segments: _Optional[_Iterable[_Union[TranscriptSegment, _Mapping]]] = ..., text: _Optional[str] = ..., language: _Optional[str] = ..., duration: _Optional[float] = ...) -> None: ...

class TranscriptStreamResponse(_message.Message):
    __slots__ = ("delta", "final_result")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_RESULT_FIELD_NUMBER: _ClassVar[int]
    delta: str
    final_result: TranscriptResult
    def __init__(self, delta: _Optional[str] = ..., final_result: _Optional[_Union[TranscriptResult, _Mapping]] = ...) -> None: ...

class TranscriptSegment(_message.Message):
    __slots__ = ("id", "start", "end", "text", "tokens", "speaker")
    ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    id: int
    start: int
    end: int
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    speaker: str
    def __init__(self, id: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., text: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., speaker: _Optional[str] = ...) -> None: ...

class GenerateImageRequest(_message.Message):
    __slots__ = ("height", "width", "step", "seed", "positive_prompt", "negative_prompt", "dst", "src", "EnableParameters", "CLIPSkip", "ref_images")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    ENABLEPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CLIPSKIP_FIELD_NUMBER: _ClassVar[int]
    REF_IMAGES_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    step: int
    seed: int
    positive_prompt: str
    negative_prompt: str
    dst: str
    src: str
    EnableParameters: str
    CLIPSkip: int
    ref_images: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., step: _Optional[int] = ..., seed: _Optional[int] = ..., positive_prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., dst: _Optional[str] = ..., src: _Optional[str] = ..., EnableParameters: _Optional[str] = ..., CLIPSkip: _Optional[int] = ..., ref_images: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateVideoRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "start_image", "end_image", "width", "height", "num_frames", "fps", "seed", "cfg_scale", "step", "dst")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    START_IMAGE_FIELD_NUMBER: _ClassVar[int]
    END_IMAGE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    start_image: str
    end_image: str
    width: int
    height: int
    num_frames: int
    fps: int
    seed: int
    cfg_scale: float
    step: int
    dst: str
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., start_image: _Optional[str] = ..., end_image: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_frames: _Optional[int] = ..., fps: _Optional[int] = ..., seed: _Optional[int] = ..., cfg_scale: _Optional[float] = ..., step: _Optional[int] = ..., dst: _Optional[str] = ...) -> None: ...

class TTSRequest(_message.Message):
    __slots__ = ("text", "model", "dst", "voice", "language")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    model: str
    dst: str
    voice: str
    language: str
    def __init__(self, text: _Optional[str] = ..., model: _Optional[str] = ..., dst: _Optional[str] = ..., voice: _Optional[str] = ..., language: _Optional[str] = ...) -> None: ...

class VADRequest(_message.Message):
    __slots__ = ("audio",)
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    audio: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, audio: _Optional[_Iterable[float]] = ...) -> None: ...

class VADSegment(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: float
    end: float
    def __init__(self, start: _Optional[float] = ..., end: _Optional[float] = ...) -> None: ...

class VADResponse(_message.Message):
    __slots__ = ("segments",)
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[VADSegment]
    def __init__(self, segments: _Optional[_Iterable[_Union[VADSegment, _Mapping]]] = ...) -> None: ...

class SoundGenerationRequest(_message.Message):
    __slots__ = ("text", "model", "dst", "duration", "temperature", "sample", "src", "src_divisor", "think", "caption", "lyrics", "bpm", "keyscale", "language", "timesignature", "instrumental")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    SRC_DIVISOR_FIELD_NUMBER: _ClassVar[int]
    THINK_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    LYRICS_FIELD_NUMBER: _ClassVar[int]
    BPM_FIELD_NUMBER: _ClassVar[int]
    KEYSCALE_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TIMESIGNATURE_FIELD_NUMBER: _ClassVar[int]
    INSTRUMENTAL_FIELD_NUMBER: _ClassVar[int]
    text: str
    model: str
    dst: str
    duration: float
    temperature: float
    sample: bool
    src: str
    src_divisor: int
    think: bool
    caption: str
    lyrics: str
    bpm: int
    keyscale: str
    language: str
    timesignature: str
    instrumental: bool
    def __init__(self, text: _Optional[str] = ..., model: _Optional[str] = ..., dst: _Optional[str] = ..., duration: _Optional[float] = ..., temperature: _Optional[float] = ..., sample: _Optional[bool] = ..., src: _Optional[str] = ..., src_divisor: _Optional[int] = ..., think: _Optional[bool] = ..., caption: _Optional[str] = ..., lyrics: _Optional[str] = ..., bpm: _Optional[int] = ..., keyscale: _Optional[str] = ..., language: _Optional[str] = ..., timesignature: _Optional[str] = ..., instrumental: _Optional[bool] = ...) -> None: ...

class TokenizationResponse(_message.Message):
    __slots__ = ("length", "tokens")
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    length: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, length: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class MemoryUsageData(_message.Message):
    __slots__ = ("total", "breakdown")
    class BreakdownEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    BREAKDOWN_FIELD_NUMBER: _ClassVar[int]
    total: int
    breakdown: _containers.ScalarMap[str, int]
    def __init__(self, total: _Optional[int] = ..., breakdown: _Optional[_Mapping[str, int]] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("state", "memory")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNINITIALIZED: _ClassVar[StatusResponse.State]
        BUSY: _ClassVar[StatusResponse.State]
        READY: _ClassVar[StatusResponse.State]
        ERROR: _ClassVar[StatusResponse.State]
    UNINITIALIZED: StatusResponse.State
    BUSY: StatusResponse.State
    READY: StatusResponse.State
    ERROR: StatusResponse.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    state: StatusResponse.State
    memory: MemoryUsageData
    def __init__(self, state: _Optional[_Union[StatusResponse.State, str]] = ..., memory: _Optional[_Union[MemoryUsageData, _Mapping]] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("role", "content", "name", "tool_call_id", "reasoning_content", "tool_calls")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    REASONING_CONTENT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    name: str
    tool_call_id: str
    reasoning_content: str
    tool_calls: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ..., name: _Optional[str] = ..., tool_call_id: _Optional[str] = ..., reasoning_content: _Optional[str] = ..., tool_calls: _Optional[str] = ...) -> None: ...

class DetectOptions(_message.Message):
    __slots__ = ("src", "prompt", "points", "boxes", "threshold")
    SRC_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    src: str
    prompt: str
    points: _containers.RepeatedScalarFieldContainer[float]
    boxes: _containers.RepeatedScalarFieldContainer[float]
    threshold: float
    def __init__(self, src: _Optional[str] = ..., prompt: _Optional[str] = ..., points: _Optional[_Iterable[float]] = ..., boxes: _Optional[_Iterable[float]] = ..., threshold: _Optional[float] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("x", "y", "width", "height", "confidence", "class_name", "mask")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    width: float
    height: float
    confidence: float
    class_name: str
    mask: bytes
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., width: _Optional[float] = ..., height: _Optional[float] = ..., confidence: _Optional[float] = ..., class_name: _Optional[str] = ..., mask: _Optional[bytes] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("Detections",)
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    Detections: _containers.RepeatedCompositeFieldContainer[Detection]
    def __init__(self, Detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ...) -> None: ...

class ToolFormatMarkers(_message.Message):
    __slots__ = ("format_type", "section_start", "section_end", "per_call_start", "per_call_end", "func_name_prefix", "func_name_suffix", "func_close", "arg_name_prefix", "arg_name_suffix", "arg_value_prefix", "arg_value_suffix", "arg_separator", "name_field", "args_field", "id_field", "fun_name_is_key", "tools_array_wrapped", "reasoning_start", "reasoning_end", "content_start", "content_end", "args_start", "args_end", "function_field", "parameter_order", "gen_id_field", "call_id_position", "call_id_prefix", "call_id_suffix")
    FORMAT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SECTION_START_FIELD_NUMBER: _ClassVar[int]
    SECTION_END_FIELD_NUMBER: _ClassVar[int]
    PER_CALL_START_FIELD_NUMBER: _ClassVar[int]
    PER_CALL_END_FIELD_NUMBER: _ClassVar[int]
    FUNC_NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    FUNC_NAME_SUFFIX_FIELD_NUMBER: _ClassVar[int]
    FUNC_CLOSE_FIELD_NUMBER: _ClassVar[int]
    ARG_NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    ARG_NAME_SUFFIX_FIELD_NUMBER: _ClassVar[int]
    ARG_VALUE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    ARG_VALUE_SUFFIX_FIELD_NUMBER: _ClassVar[int]
    ARG_SEPARATOR_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_FIELD_NUMBER: _ClassVar[int]
    FUN_NAME_IS_KEY_FIELD_NUMBER: _ClassVar[int]
    TOOLS_ARRAY_WRAPPED_FIELD_NUMBER: _ClassVar[int]
    REASONING_START_FIELD_NUMBER: _ClassVar[int]
    REASONING_END_FIELD_NUMBER: _ClassVar[int]
    CONTENT_START_FIELD_NUMBER: _ClassVar[int]
    CONTENT_END_FIELD_NUMBER: _ClassVar[int]
    ARGS_START_FIELD_NUMBER: _ClassVar[int]
    ARGS_END_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_ORDER_FIELD_NUMBER: _ClassVar[int]
    GEN_ID_FIELD_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_POSITION_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_PREFIX_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_SUFFIX_FIELD_NUMBER: _ClassVar[int]
    format_type: str
    section_start: str
    section_end: str
    per_call_start: str
    per_call_end: str
    func_name_prefix: str
    func_name_suffix: str
    func_close: str
    arg_name_prefix: str
    arg_name_suffix: str
    arg_value_prefix: str
    arg_value_suffix: str
    arg_separator: str
    name_field: str
    args_field: str
    id_field: str
    fun_name_is_key: bool
    tools_array_wrapped: bool
    reasoning_start: str
    reasoning_end: str
    content_start: str
    content_end: str
    args_start: str
    args_end: str
    function_field: str
    parameter_order: _containers.RepeatedScalarFieldContainer[str]
    gen_id_field: str
    call_id_position: str
    call_id_prefix: str
    call_id_suffix: str
    def __init__(self, format_type: _Optional[str] = ..., section_start: _Optional[str] = ..., section_end: _Optional[str] = ..., per_call_start: _Optional[str] = ..., per_call_end: _Optional[str] = ..., func_name_prefix: _Optional[str] = ..., func_name_suffix: _Optional[str] = ..., func_close: _Optional[str] = ..., arg_name_prefix: _Optional[str] = ..., arg_name_suffix: _Optional[str] = ..., arg_value_prefix: _Optional[str] = ..., arg_value_suffix: _Optional[str] = ..., arg_separator: _Optional[str] = ..., name_field: _Optional[str] = ..., args_field: _Optional[str] = ..., id_field: _Optional[str] = ..., fun_name_is_key: _Optional[bool] = ..., tools_array_wrapped: _Optional[bool] = ..., reasoning_start: _Optional[str] = ..., reasoning_end: _Optional[str] = ..., content_start: _Optional[str] = ..., content_end: _Optional[str] = ..., args_start: _Optional[str] = ..., args_end: _Optional[str] = ..., function_field: _Optional[str] = ..., parameter_order: _Optional[_Iterable[str]] = ..., gen_id_field: _Optional[str] = ..., call_id_position: _Optional[str] = ..., call_id_prefix: _Optional[str] = ..., call_id_suffix: _Optional[str] = ...) -> None: ...

class AudioEncodeRequest(_message.Message):
    __slots__ = ("pcm_data", "sample_rate", "channels", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PCM_DATA_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    pcm_data: bytes
    sample_rate: int
    channels: int
    options: _containers.ScalarMap[str, str]
    def __init__(self, pcm_data: _Optional[bytes] = ..., sample_rate: _Optional[int] = ..., channels: _Optional[int] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AudioEncodeResult(_message.Message):
    __slots__ = ("frames", "sample_rate", "samples_per_frame")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedScalarFieldContainer[bytes]
    sample_rate: int
    samples_per_frame: int
    def __init__(self, frames: _Optional[_Iterable[bytes]] = ..., sample_rate: _Optional[int] = ..., samples_per_frame: _Optional[int] = ...) -> None: ...

class AudioDecodeRequest(_message.Message):
    __slots__ = ("frames", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedScalarFieldContainer[bytes]
    options: _containers.ScalarMap[str, str]
    def __init__(self, frames: _Optional[_Iterable[bytes]] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AudioDecodeResult(_message.Message):
    __slots__ = ("pcm_data", "sample_rate", "samples_per_frame")
    PCM_DATA_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    pcm_data: bytes
    sample_rate: int
    samples_per_frame: int
    def __init__(self, pcm_data: _Optional[bytes] = ..., sample_rate: _Optional[int] = ..., samples_per_frame: _Optional[int] = ...) -> None: ...

class ModelMetadataResponse(_message.Message):
    __slots__ = ("supports_thinking", "rendered_template", "tool_format", "media_marker")
    SUPPORTS_THINKING_FIELD_NUMBER: _ClassVar[int]
    RENDERED_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    TOOL_FORMAT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_MARKER_FIELD_NUMBER: _ClassVar[int]
    supports_thinking: bool
    rendered_template: str
    tool_format: ToolFormatMarkers
    media_marker: str
    def __init__(self, supports_thinking: _Optional[bool] = ..., rendered_template: _Optional[str] = ..., tool_format: _Optional[_Union[ToolFormatMarkers, _Mapping]] = ..., media_marker: _Optional[str] = ...) -> None: ...

class FineTuneRequest(_message.Message):
    __slots__ = ("model", "training_type", "training_method", "adapter_rank", "adapter_alpha", "adapter_dropout", "target_modules", "learning_rate", "num_epochs", "batch_size", "gradient_accumulation_steps", "warmup_steps", "max_steps", "save_steps", "weight_decay", "gradient_checkpointing", "optimizer", "seed", "mixed_precision", "dataset_source", "dataset_split", "output_dir", "job_id", "resume_from_checkpoint", "extra_options")
    class ExtraOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAINING_TYPE_FIELD_NUMBER: _ClassVar[int]
    TRAINING_METHOD_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_RANK_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ALPHA_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    NUM_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    SAVE_STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MIXED_PRECISION_FIELD_NUMBER: _ClassVar[int]
    DATASET_SOURCE_FIELD_NUMBER: _ClassVar[int]
    DATASET_SPLIT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    EXTRA_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    training_type: str
    training_method: str
    adapter_rank: int
    adapter_alpha: int
    adapter_dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    learning_rate: float
    num_epochs: int
    batch_size: int
    gradient_accumulation_steps: int
    warmup_steps: int
    max_steps: int
    save_steps: int
    weight_decay: float
    gradient_checkpointing: bool
    optimizer: str
    seed: int
    mixed_precision: str
    dataset_source: str
    dataset_split: str
    output_dir: str
    job_id: str
    resume_from_checkpoint: str
    extra_options: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., training_type: _Optional[str] = ..., training_method: _Optional[str] = ..., adapter_rank: _Optional[int] = ..., adapter_alpha: _Optional[int] = ..., adapter_dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., learning_rate: _Optional[float] = ..., num_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., warmup_steps: _Optional[int] = ..., max_steps: _Optional[int] = ..., save_steps: _Optional[int] = ..., weight_decay: _Optional[float] = ..., gradient_checkpointing: _Optional[bool] = ..., optimizer: _Optional[str] = ..., seed: _Optional[int] = ..., mixed_precision: _Optional[str] = ..., dataset_source: _Optional[str] = ..., dataset_split: _Optional[str] = ..., output_dir: _Optional[str] = ..., job_id: _Optional[str] = ..., resume_from_checkpoint: _Optional[str] = ..., extra_options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class FineTuneJobResult(_message.Message):
    __slots__ = ("job_id", "success", "message")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    success: bool
    message: str
    def __init__(self, job_id: _Optional[str] = ..., success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class FineTuneProgressRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class FineTuneProgressUpdate(_message.Message):
    __slots__ = ("job_id", "current_step", "total_steps", "current_epoch", "total_epochs", "loss", "learning_rate", "grad_norm", "eval_loss", "eta_seconds", "progress_percent", "status", "message", "checkpoint_path", "sample_path", "extra_metrics")
    class ExtraMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_PERCENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_PATH_FIELD_NUMBER: _ClassVar[int]
    EXTRA_METRICS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    current_step: int
    total_steps: int
    current_epoch: float
    total_epochs: float
    loss: float
    learning_rate: float
    grad_norm: float
    eval_loss: float
    eta_seconds: float
    progress_percent: float
    status: str
    message: str
    checkpoint_path: str
    sample_path: str
    extra_metrics: _containers.ScalarMap[str, float]
    def __init__(self, job_id: _Optional[str] = ..., current_step: _Optional[int] = ..., total_steps: _Optional[int] = ..., current_epoch: _Optional[float] = ..., total_epochs: _Optional[float] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., grad_norm: _Optional[float] = ..., eval_loss: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., progress_percent: _Optional[float] = ..., status: _Optional[str] = ..., message: _Optional[str] = ..., checkpoint_path: _Optional[str] = ..., sample_path: _Optional[str] = ..., extra_metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class FineTuneStopRequest(_message.Message):
    __slots__ = ("job_id", "save_checkpoint")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SAVE_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    save_checkpoint: bool
    def __init__(self, job_id: _Optional[str] = ..., save_checkpoint: _Optional[bool] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("output_dir",)
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    output_dir: str
    def __init__(self, output_dir: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("path", "step", "epoch", "loss", "created_at")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    path: str
    step: int
    epoch: float
    loss: float
    created_at: str
    def __init__(self, path: _Optional[str] = ..., step: _Optional[int] = ..., epoch: _Optional[float] = ..., loss: _Optional[float] = ..., created_at: _Optional[str] = ...) -> None: ...

class ExportModelRequest(_message.Message):
    __slots__ = ("checkpoint_path", "output_path", "export_format", "quantization_method", "model", "extra_options")
    class ExtraOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXTRA_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    checkpoint_path: str
    output_path: str
    export_format: str
    quantization_method: str
    model: str
    extra_options: _containers.ScalarMap[str, str]
    def __init__(self, checkpoint_path: _Optional[str] = ..., output_path: _Optional[str] = ..., export_format: _Optional[str] = ..., quantization_method: _Optional[str] = ..., model: _Optional[str] = ..., extra_options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class QuantizationRequest(_message.Message):
    __slots__ = ("model", "quantization_type", "output_dir", "job_id", "extra_options")
    class ExtraOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_TYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EXTRA_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    quantization_type: str
    output_dir: str
    job_id: str
    extra_options: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., quantization_type: _Optional[str] = ..., output_dir: _Optional[str] = ..., job_id: _Optional[str] = ..., extra_options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class QuantizationJobResult(_message.Message):
    __slots__ = ("job_id", "success", "message")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    success: bool
    message: str
    def __init__(self, job_id: _Optional[str] = ..., success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class QuantizationProgressRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class QuantizationProgressUpdate(_message.Message):
    __slots__ = ("job_id", "progress_percent", "status", "message", "output_file", "extra_metrics")
    class ExtraMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_PERCENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FILE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_METRICS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    progress_percent: float
    status: str
    message: str
    output_file: str
    extra_metrics: _containers.ScalarMap[str, float]
    def __init__(self, job_id: _Optional[str] = ..., progress_percent: _Optional[float] = ..., status: _Optional[str] = ..., message: _Optional[str] = ..., output_file: _Optional[str] = ..., extra_metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class QuantizationStopRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...
