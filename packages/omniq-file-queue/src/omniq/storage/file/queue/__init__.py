"""OmniQ's file task queue: ``AsyncFileQueue`` and its blocking twin ``FileQueue``."""

from __future__ import annotations

from omniq.core.sync import StorageTwin, blocking, no_wait

from ._queue import AsyncFileQueue, default_worker_id

__version__ = "0.1.0"  # the only copy (pyproject: dynamic); change it with tools/bump.py


class FileQueue(StorageTwin[AsyncFileQueue]):
    """Blocking twin of :class:`AsyncFileQueue` (same arguments, same method names)."""

    async_class = AsyncFileQueue

    enqueue = blocking(AsyncFileQueue.enqueue, inline=True)
    enqueue_many = blocking(AsyncFileQueue.enqueue_many, inline=True)
    dequeue = blocking(AsyncFileQueue.dequeue, inline=no_wait)
    dequeue_many = blocking(AsyncFileQueue.dequeue_many, inline=no_wait)
    ack = blocking(AsyncFileQueue.ack, inline=True)
    ack_many = blocking(AsyncFileQueue.ack_many, inline=True)
    nack = blocking(AsyncFileQueue.nack, inline=True)
    release = blocking(AsyncFileQueue.release, inline=True)
    extend_lease = blocking(AsyncFileQueue.extend_lease, inline=True)
    reap = blocking(AsyncFileQueue.reap)
    repair = blocking(AsyncFileQueue.repair)
    maintain = blocking(AsyncFileQueue.maintain)
    get_task = blocking(AsyncFileQueue.get_task, inline=True)
    cancel = blocking(AsyncFileQueue.cancel)
    size = blocking(AsyncFileQueue.size, inline=True)
    list_queues = blocking(AsyncFileQueue.list_queues)
    next_due = blocking(AsyncFileQueue.next_due)
    purge = blocking(AsyncFileQueue.purge)
    list_dead = blocking(AsyncFileQueue.list_dead)
    list_tasks = blocking(AsyncFileQueue.list_tasks)
    requeue_dead = blocking(AsyncFileQueue.requeue_dead)
    delete_dead = blocking(AsyncFileQueue.delete_dead)


__all__ = ["AsyncFileQueue", "FileQueue", "default_worker_id"]
