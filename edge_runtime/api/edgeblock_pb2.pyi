import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Image(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class PersonalizeRequest(_message.Message):
    __slots__ = ("images", "token", "class_noun", "steps", "learning_rate", "seed", "checkpoint_every", "name", "precompute", "captions", "class_images", "class_captions", "prior_share", "request_id", "lr_schedule", "warmup_steps", "validation_prompts", "validation_every")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLASS_NOUN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    CLASS_CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_SHARE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_EVERY_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    token: str
    class_noun: str
    steps: int
    learning_rate: float
    seed: int
    checkpoint_every: int
    name: str
    precompute: str
    captions: _containers.RepeatedScalarFieldContainer[str]
    class_images: _containers.RepeatedCompositeFieldContainer[Image]
    class_captions: _containers.RepeatedScalarFieldContainer[str]
    prior_share: float
    request_id: str
    lr_schedule: str
    warmup_steps: int
    validation_prompts: _containers.RepeatedScalarFieldContainer[str]
    validation_every: int
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., token: _Optional[str] = ..., class_noun: _Optional[str] = ..., steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., seed: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., name: _Optional[str] = ..., precompute: _Optional[str] = ..., captions: _Optional[_Iterable[str]] = ..., class_images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., class_captions: _Optional[_Iterable[str]] = ..., prior_share: _Optional[float] = ..., request_id: _Optional[str] = ..., lr_schedule: _Optional[str] = ..., warmup_steps: _Optional[int] = ..., validation_prompts: _Optional[_Iterable[str]] = ..., validation_every: _Optional[int] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("kind", "job_id", "step", "total_steps", "loss", "adapter_id", "message", "queue_position", "progress", "elapsed_s", "elapsed", "png", "prompt")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[JobEvent.Kind]
        KIND_QUEUED: _ClassVar[JobEvent.Kind]
        KIND_ENCODING: _ClassVar[JobEvent.Kind]
        KIND_PRECOMPUTING: _ClassVar[JobEvent.Kind]
        KIND_STEP: _ClassVar[JobEvent.Kind]
        KIND_CHECKPOINT: _ClassVar[JobEvent.Kind]
        KIND_DONE: _ClassVar[JobEvent.Kind]
        KIND_FAILED: _ClassVar[JobEvent.Kind]
        KIND_CANCELLED: _ClassVar[JobEvent.Kind]
        KIND_VALIDATION: _ClassVar[JobEvent.Kind]
    KIND_UNSPECIFIED: JobEvent.Kind
    KIND_QUEUED: JobEvent.Kind
    KIND_ENCODING: JobEvent.Kind
    KIND_PRECOMPUTING: JobEvent.Kind
    KIND_STEP: JobEvent.Kind
    KIND_CHECKPOINT: JobEvent.Kind
    KIND_DONE: JobEvent.Kind
    KIND_FAILED: JobEvent.Kind
    KIND_CANCELLED: JobEvent.Kind
    KIND_VALIDATION: JobEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    kind: JobEvent.Kind
    job_id: str
    step: int
    total_steps: int
    loss: float
    adapter_id: str
    message: str
    queue_position: int
    progress: float
    elapsed_s: float
    elapsed: _duration_pb2.Duration
    png: bytes
    prompt: str
    def __init__(self, kind: _Optional[_Union[JobEvent.Kind, str]] = ..., job_id: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., adapter_id: _Optional[str] = ..., message: _Optional[str] = ..., queue_position: _Optional[int] = ..., progress: _Optional[float] = ..., elapsed_s: _Optional[float] = ..., elapsed: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., png: _Optional[bytes] = ..., prompt: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "adapter_id", "seed", "steps", "guidance", "size", "negative_prompt", "num_images", "adapters", "width", "height")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    adapter_id: str
    seed: int
    steps: int
    guidance: float
    size: int
    negative_prompt: str
    num_images: int
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterWeight]
    width: int
    height: int
    def __init__(self, prompt: _Optional[str] = ..., adapter_id: _Optional[str] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., size: _Optional[int] = ..., negative_prompt: _Optional[str] = ..., num_images: _Optional[int] = ..., adapters: _Optional[_Iterable[_Union[AdapterWeight, _Mapping]]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ImageSize(_message.Message):
    __slots__ = ("width", "height")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class AdapterWeight(_message.Message):
    __slots__ = ("adapter_id", "scale")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    scale: float
    def __init__(self, adapter_id: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("png", "seed")
    PNG_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    seed: int
    def __init__(self, png: _Optional[bytes] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: GenerateProgress
    result: GenerateResponse
    def __init__(self, progress: _Optional[_Union[GenerateProgress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class GenerateProgress(_message.Message):
    __slots__ = ("image", "step", "total_steps", "elapsed")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_FIELD_NUMBER: _ClassVar[int]
    image: int
    step: int
    total_steps: int
    elapsed: _duration_pb2.Duration
    def __init__(self, image: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., elapsed: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("png", "seed", "steps", "guidance", "size", "adapter_id", "time_s", "mode", "time", "images", "adapters", "width", "height")
    PNG_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_S_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    seed: int
    steps: int
    guidance: float
    size: int
    adapter_id: str
    time_s: float
    mode: str
    time: _duration_pb2.Duration
    images: _containers.RepeatedCompositeFieldContainer[GeneratedImage]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterWeight]
    width: int
    height: int
    def __init__(self, png: _Optional[bytes] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., size: _Optional[int] = ..., adapter_id: _Optional[str] = ..., time_s: _Optional[float] = ..., mode: _Optional[str] = ..., time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., images: _Optional[_Iterable[_Union[GeneratedImage, _Mapping]]] = ..., adapters: _Optional[_Iterable[_Union[AdapterWeight, _Mapping]]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("id", "name", "token", "class_noun", "steps", "final_loss", "created", "sha256", "lora_rank", "job_id", "size_bytes", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLASS_NOUN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    token: str
    class_noun: str
    steps: int
    final_loss: float
    created: float
    sha256: str
    lora_rank: int
    job_id: str
    size_bytes: int
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., token: _Optional[str] = ..., class_noun: _Optional[str] = ..., steps: _Optional[int] = ..., final_loss: _Optional[float] = ..., created: _Optional[float] = ..., sha256: _Optional[str] = ..., lora_rank: _Optional[int] = ..., job_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    next_page_token: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ExportAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class ExportAdapterResponse(_message.Message):
    __slots__ = ("safetensors", "filename", "adapter")
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    safetensors: bytes
    filename: str
    adapter: Adapter
    def __init__(self, safetensors: _Optional[bytes] = ..., filename: _Optional[str] = ..., adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "state", "step", "total_steps", "loss", "adapter_id", "message", "checkpoint_step", "created", "updated", "request_id", "name", "create_time", "update_time")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Job.State]
        STATE_QUEUED: _ClassVar[Job.State]
        STATE_RUNNING: _ClassVar[Job.State]
        STATE_DONE: _ClassVar[Job.State]
        STATE_FAILED: _ClassVar[Job.State]
        STATE_CANCELLED: _ClassVar[Job.State]
    STATE_UNSPECIFIED: Job.State
    STATE_QUEUED: Job.State
    STATE_RUNNING: Job.State
    STATE_DONE: Job.State
    STATE_FAILED: Job.State
    STATE_CANCELLED: Job.State
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: Job.State
    step: int
    total_steps: int
    loss: float
    adapter_id: str
    message: str
    checkpoint_step: int
    created: float
    updated: float
    request_id: str
    name: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[Job.State, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., adapter_id: _Optional[str] = ..., message: _Optional[str] = ..., checkpoint_step: _Optional[int] = ..., created: _Optional[float] = ..., updated: _Optional[float] = ..., request_id: _Optional[str] = ..., name: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_images", "max_image_bytes", "max_image_pixels", "max_steps", "max_prompt_chars", "max_generate_steps", "max_queue", "max_concurrent_generations", "max_finished_jobs", "finished_job_retention", "max_page_size", "max_num_images", "max_adapters_per_generation", "max_validation_prompts", "max_validation_images")
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATE_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_FINISHED_JOBS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_JOB_RETENTION_FIELD_NUMBER: _ClassVar[int]
    MAX_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_PER_GENERATION_FIELD_NUMBER: _ClassVar[int]
    MAX_VALIDATION_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_VALIDATION_IMAGES_FIELD_NUMBER: _ClassVar[int]
    max_images: int
    max_image_bytes: int
    max_image_pixels: int
    max_steps: int
    max_prompt_chars: int
    max_generate_steps: int
    max_queue: int
    max_concurrent_generations: int
    max_finished_jobs: int
    finished_job_retention: _duration_pb2.Duration
    max_page_size: int
    max_num_images: int
    max_adapters_per_generation: int
    max_validation_prompts: int
    max_validation_images: int
    def __init__(self, max_images: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_prompt_chars: _Optional[int] = ..., max_generate_steps: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_concurrent_generations: _Optional[int] = ..., max_finished_jobs: _Optional[int] = ..., finished_job_retention: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_page_size: _Optional[int] = ..., max_num_images: _Optional[int] = ..., max_adapters_per_generation: _Optional[int] = ..., max_validation_prompts: _Optional[int] = ..., max_validation_images: _Optional[int] = ...) -> None: ...

class Defaults(_message.Message):
    __slots__ = ("steps", "learning_rate", "checkpoint_every", "generate_steps", "guidance", "seed", "lr_schedule", "warmup_steps", "prior_share", "precompute", "num_images", "adapter_scale", "size")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    GENERATE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_SHARE_FIELD_NUMBER: _ClassVar[int]
    PRECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SCALE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    steps: int
    learning_rate: float
    checkpoint_every: int
    generate_steps: int
    guidance: float
    seed: int
    lr_schedule: str
    warmup_steps: int
    prior_share: float
    precompute: str
    num_images: int
    adapter_scale: float
    size: int
    def __init__(self, steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., checkpoint_every: _Optional[int] = ..., generate_steps: _Optional[int] = ..., guidance: _Optional[float] = ..., seed: _Optional[int] = ..., lr_schedule: _Optional[str] = ..., warmup_steps: _Optional[int] = ..., prior_share: _Optional[float] = ..., precompute: _Optional[str] = ..., num_images: _Optional[int] = ..., adapter_scale: _Optional[float] = ..., size: _Optional[int] = ...) -> None: ...

class Info(_message.Message):
    __slots__ = ("family", "parameters", "trainable_blocks", "num_blocks", "train_res", "gen_res", "sizes", "lora_rank", "trainer", "executor", "limits", "defaults", "version", "memory", "settings", "guidance_embedded", "multi_adapter", "gen_sizes")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_RES_FIELD_NUMBER: _ClassVar[int]
    GEN_RES_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_EMBEDDED_FIELD_NUMBER: _ClassVar[int]
    MULTI_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    GEN_SIZES_FIELD_NUMBER: _ClassVar[int]
    family: str
    parameters: int
    trainable_blocks: _containers.RepeatedScalarFieldContainer[int]
    num_blocks: int
    train_res: int
    gen_res: int
    sizes: _containers.RepeatedScalarFieldContainer[int]
    lora_rank: int
    trainer: str
    executor: str
    limits: Limits
    defaults: Defaults
    version: str
    memory: Memory
    settings: Settings
    guidance_embedded: bool
    multi_adapter: bool
    gen_sizes: _containers.RepeatedCompositeFieldContainer[ImageSize]
    def __init__(self, family: _Optional[str] = ..., parameters: _Optional[int] = ..., trainable_blocks: _Optional[_Iterable[int]] = ..., num_blocks: _Optional[int] = ..., train_res: _Optional[int] = ..., gen_res: _Optional[int] = ..., sizes: _Optional[_Iterable[int]] = ..., lora_rank: _Optional[int] = ..., trainer: _Optional[str] = ..., executor: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., defaults: _Optional[_Union[Defaults, _Mapping]] = ..., version: _Optional[str] = ..., memory: _Optional[_Union[Memory, _Mapping]] = ..., settings: _Optional[_Union[Settings, _Mapping]] = ..., guidance_embedded: _Optional[bool] = ..., multi_adapter: _Optional[bool] = ..., gen_sizes: _Optional[_Iterable[_Union[ImageSize, _Mapping]]] = ...) -> None: ...

class Settings(_message.Message):
    __slots__ = ("config_file", "listen", "state_dir", "auth", "tls", "mtls", "allow_insecure_remote", "trainer", "train_device", "threads", "workers", "prompt_cache_mb", "log_level", "log_format", "keepalive_time")
    CONFIG_FILE_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    STATE_DIR_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    MTLS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_INSECURE_REMOTE_FIELD_NUMBER: _ClassVar[int]
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    TRAIN_DEVICE_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_MB_FIELD_NUMBER: _ClassVar[int]
    LOG_LEVEL_FIELD_NUMBER: _ClassVar[int]
    LOG_FORMAT_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    config_file: str
    listen: str
    state_dir: str
    auth: bool
    tls: bool
    mtls: bool
    allow_insecure_remote: bool
    trainer: str
    train_device: str
    threads: int
    workers: int
    prompt_cache_mb: float
    log_level: str
    log_format: str
    keepalive_time: _duration_pb2.Duration
    def __init__(self, config_file: _Optional[str] = ..., listen: _Optional[str] = ..., state_dir: _Optional[str] = ..., auth: _Optional[bool] = ..., tls: _Optional[bool] = ..., mtls: _Optional[bool] = ..., allow_insecure_remote: _Optional[bool] = ..., trainer: _Optional[str] = ..., train_device: _Optional[str] = ..., threads: _Optional[int] = ..., workers: _Optional[int] = ..., prompt_cache_mb: _Optional[float] = ..., log_level: _Optional[str] = ..., log_format: _Optional[str] = ..., keepalive_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Memory(_message.Message):
    __slots__ = ("budget_bytes", "in_use_bytes", "admission", "planner_target", "job_peak_bytes", "generate_resident_bytes", "generate_streamed_bytes", "generate_resident_rows_bytes")
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    IN_USE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    PLANNER_TARGET_FIELD_NUMBER: _ClassVar[int]
    JOB_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    GENERATE_RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    GENERATE_STREAMED_BYTES_FIELD_NUMBER: _ClassVar[int]
    GENERATE_RESIDENT_ROWS_BYTES_FIELD_NUMBER: _ClassVar[int]
    budget_bytes: int
    in_use_bytes: int
    admission: bool
    planner_target: str
    job_peak_bytes: int
    generate_resident_bytes: int
    generate_streamed_bytes: int
    generate_resident_rows_bytes: int
    def __init__(self, budget_bytes: _Optional[int] = ..., in_use_bytes: _Optional[int] = ..., admission: _Optional[bool] = ..., planner_target: _Optional[str] = ..., job_peak_bytes: _Optional[int] = ..., generate_resident_bytes: _Optional[int] = ..., generate_streamed_bytes: _Optional[int] = ..., generate_resident_rows_bytes: _Optional[int] = ...) -> None: ...
