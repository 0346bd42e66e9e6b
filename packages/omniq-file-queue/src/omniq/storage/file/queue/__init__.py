"""OmniQ's file task queue: ``AsyncFileQueue`` and its blocking twin ``FileQueue``."""

from __future__ import annotations

from omniq.core.sync import StorageTwin, blocking

from ._queue import AsyncFileQueue, default_worker_id

__version__ = "0.1.0"  # the only copy (pyproject: dynamic); change it with tools/bump.py


class FileQueue(StorageTwin[AsyncFileQueue]):
    """Blocking twin of :class:`AsyncFileQueue` (same arguments, same method names)."""

    async_class = AsyncFileQueue

    enqueue = blocking(AsyncFileQueue.enqueue)
    enqueue_many = blocking(AsyncFileQueue.enqueue_many)
    dequeue = blocking(AsyncFileQueue.dequeue)
    dequeue_many = blocking(AsyncFileQueue.dequeue_many)
    ack = blocking(AsyncFileQueue.ack)
    ack_many = blocking(AsyncFileQueue.ack_many)
    nack = blocking(AsyncFileQueue.nack)
    release = blocking(AsyncFileQueue.release)
    extend_lease = blocking(AsyncFileQueue.extend_lease)
    reap = blocking(AsyncFileQueue.reap)
    repair = blocking(AsyncFileQueue.repair)
    maintain = blocking(AsyncFileQueue.maintain)
    get_task = blocking(AsyncFileQueue.get_task)
    cancel = blocking(AsyncFileQueue.cancel)
    size = blocking(AsyncFileQueue.size)
    list_queues = blocking(AsyncFileQueue.list_queues)
    next_due = blocking(AsyncFileQueue.next_due)
    purge = blocking(AsyncFileQueue.purge)
    list_dead = blocking(AsyncFileQueue.list_dead)
    list_tasks = blocking(AsyncFileQueue.list_tasks)
    requeue_dead = blocking(AsyncFileQueue.requeue_dead)
    delete_dead = blocking(AsyncFileQueue.delete_dead)


__all__ = ["AsyncFileQueue", "FileQueue", "default_worker_id"]
