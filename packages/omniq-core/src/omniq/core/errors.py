"""One exception hierarchy for every OmniQ package."""

from __future__ import annotations


class OmniQError(Exception):
    """Base class of every error OmniQ raises on purpose."""


class NotFoundError(OmniQError, LookupError):
    """A task, result or record does not exist (or has expired)."""


class LeaseLostError(OmniQError):
    """The claim was taken over by another worker (or finished); nothing was changed."""


class TaskCancelledError(OmniQError):
    """The task was cancelled while it was running; its next heartbeat learns it."""


class InvalidNameError(OmniQError, ValueError):
    """A queue name, task id or key that could escape ``base_dir`` or is otherwise unsafe."""


class SerializationError(OmniQError, TypeError):
    """A value cannot be carried by the JSON codec, or a stored document cannot be read."""


class StorageError(OmniQError, OSError):
    """The filesystem failed; ``__cause__`` holds the original exception."""


class CapabilityError(OmniQError):
    """The filesystem lacks a guarantee the operation needs (e.g. exclusive create)."""


class ConfigurationError(OmniQError, ValueError):
    """Bad or missing configuration."""


class MissingDependencyError(OmniQError, ImportError):
    """An optional filesystem plugin is not installed; the message names the extra."""


class ResultTimeoutError(OmniQError, TimeoutError):
    """Waiting for a result took longer than the timeout."""


class AsyncContextError(OmniQError, RuntimeError):
    """A blocking (sync) API was called from a thread whose event loop is running."""


class DependencyError(OmniQError, ValueError):
    """``depends_on`` names a task that is unknown (never enqueued, or finished and cleaned
    up), or would make a cycle; nothing was enqueued. ``task_ids`` names the culprits."""

    def __init__(self, message: str, task_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.task_ids = list(task_ids or [])


class UnknownDependencyError(DependencyError, LookupError):
    """A dependency is not in any queue: never enqueued, or finished and cleaned up."""


class DependencyCycleError(DependencyError):
    """The task would (transitively) depend on itself."""
