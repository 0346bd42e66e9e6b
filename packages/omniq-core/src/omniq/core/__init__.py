"""OmniQ core: models, the storage contract, the JSON codec, errors, the sync bridge and the
fsspec plumbing shared by every file storage."""

from ._redact import RedactFilter, redact_logs
from .codec import check_json_value, decode, encode
from .context import TaskContext
from .errors import (
    AsyncContextError,
    CapabilityError,
    ConfigurationError,
    InvalidNameError,
    LeaseLostError,
    MissingDependencyError,
    NotFoundError,
    OmniQError,
    ResultTimeoutError,
    SerializationError,
    StorageError,
    TaskCancelledError,
)
from .fs import Store
from .interfaces import AsyncEventStorage, AsyncQueue, AsyncResultStorage
from .models import (
    Claimed,
    ErrorInfo,
    EventType,
    Progress,
    QueueSize,
    ResultStatus,
    Task,
    TaskEvent,
    TaskInfo,
    TaskPage,
    TaskResult,
    TaskStatus,
    new_id,
    utcnow,
)
from .names import validate_name
from .sync import SyncWrapper, blocking, delegate, run_sync

__version__ = "0.1.0"  # the only copy (pyproject: dynamic); change it with tools/bump.py

__all__ = [
    "AsyncContextError",
    "AsyncEventStorage",
    "AsyncQueue",
    "AsyncResultStorage",
    "CapabilityError",
    "Claimed",
    "ConfigurationError",
    "ErrorInfo",
    "EventType",
    "InvalidNameError",
    "LeaseLostError",
    "MissingDependencyError",
    "NotFoundError",
    "OmniQError",
    "Progress",
    "QueueSize",
    "RedactFilter",
    "ResultStatus",
    "ResultTimeoutError",
    "SerializationError",
    "StorageError",
    "Store",
    "SyncWrapper",
    "Task",
    "TaskCancelledError",
    "TaskContext",
    "TaskEvent",
    "TaskInfo",
    "TaskPage",
    "TaskResult",
    "TaskStatus",
    "blocking",
    "delegate",
    "check_json_value",
    "decode",
    "encode",
    "new_id",
    "redact_logs",
    "run_sync",
    "utcnow",
    "validate_name",
]
