"""A TCP proxy that injects network faults between HTTP clients and one loopback endpoint.

It sits in front of a storage emulator (moto, fake-gcs-server, azurite) so that the SDKs
(botocore, gcsfs's aiohttp, the Azure SDK) see the faults a real network produces. Standard
library only; it runs its own asyncio loop in a daemon thread and is controlled from any
thread while it runs::

    from fault_proxy import FaultProxy

    with FaultProxy(("127.0.0.1", emulator.port)) as proxy:
        options = {..., "endpoint_url": proxy.endpoint}     # clients talk to the proxy
        proxy.set_mode("reset", p=0.1)                      # then "delay", "drop_response", ...
        proxy.set_mode("blackhole", seconds=15)             # back to "pass" by itself
        proxy.heal()
        print(proxy.counters())

Modes (``set_mode(mode, p=..., seconds=...)``; ``set_faults`` mixes the first three):

* ``pass``: forward bytes both ways untouched.
* ``reset``: with probability ``p`` per request, either forward half of the request's first
  chunk and reset both connections (RST: the server never sees a whole request), or let the
  request through, forward half of the response's first chunk and reset (the server did the
  work; the client gets a truncated response).
* ``delay``: with probability ``p`` per request (default 1), hold the response for a random
  0.5-3 s (``delay_range``) before the first byte goes to the client.
* ``drop_response``: with probability ``p`` per writing request (PUT, POST, DELETE, PATCH by
  default: ``drop_methods``), forward the request, wait until the server starts answering (the
  write happened), then close the client connection without a byte of the response: the
  "lost response" an SDK retries, and then gets "already exists"/412 for its own write.
* ``blackhole``: for ``seconds``, accept connections and read what clients send, but forward
  nothing and answer nothing (responses of requests already forwarded are swallowed too); at
  the end the connections that lost bytes are reset (their streams are out of step), the
  others carry on.
* ``refuse``: for ``seconds``, reset every open connection and stop listening, so connects
  are refused (ECONNREFUSED); then listen again on the same port (a bound, non-listening
  socket holds the port meanwhile, so no other socket takes it).

Bounds: only loopback addresses (listening and target); a delay is at most ``MAX_DELAY`` s;
blackhole and refuse periods at most ``MAX_OUTAGE`` s; the proxy stops by itself after
``lifetime`` seconds (default 15 minutes) even if nobody calls ``stop()``.

``counters()`` says what was injected: ``reset_request``, ``reset_response``, ``delay``,
``drop_response``, ``blackholed`` (connections that lost bytes to a black hole),
``blackhole_periods``, ``refuse_periods``, ``refuse_resets`` (connections reset when a refuse
period began), plus the traffic seen (``connections``, ``requests``, ``responses``);
``faults_injected()`` is their sum over the fault kinds.

By hand: ``python tools/fault_proxy.py TARGET_PORT [--schedule reset:0.1:10,delay:0.3:10,
drop_response:0.1:10,blackhole:15,refuse:15] [--lifetime S]`` prints the proxy's endpoint,
runs the schedule (or passes traffic until Ctrl-C) and prints the counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["MAX_DELAY", "MAX_OUTAGE", "MODES", "FaultProxy", "main"]

MODES = ("pass", "reset", "delay", "drop_response", "blackhole", "refuse")
#: The fault kinds counted by ``faults_injected()``.
FAULT_KINDS = (
    "reset_request",
    "reset_response",
    "delay",
    "drop_response",
    "blackholed",
    "refuse_resets",
)
#: Longest delay of one response, in seconds.
MAX_DELAY = 10.0
#: Longest black hole or refuse period, in seconds.
MAX_OUTAGE = 120.0
WRITE_METHODS = (b"PUT", b"POST", b"DELETE", b"PATCH")
CHUNK = 65536

T = TypeVar("T")


def _loopback(host: str) -> str:
    """``host`` as an IP address, refusing anything that is not a loopback address."""
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"the fault proxy only uses loopback IP addresses, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"the fault proxy only uses loopback addresses, not {host!r}")
    return str(address)


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.transport.abort()


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    turn: str = ""  # "client" while a request flows, "server" while its response flows
    method: bytes = b""
    plan: str | None = None  # the fault planned for the current exchange
    delay: float = 0.0
    poisoned: bool = False  # lost bytes to a black hole: reset when it ends
    closed: bool = False
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


class FaultProxy:
    """A fault-injecting TCP proxy from ``host``:``port`` (ephemeral by default) to
    ``target`` (``(host, port)``, loopback only). See the module docstring."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int | None = None,
        lifetime: float = 900.0,
        delay_range: tuple[float, float] = (0.5, 3.0),
        drop_methods: Iterable[bytes] = WRITE_METHODS,
    ) -> None:
        self.target = (_loopback(target[0]), int(target[1]))
        self.host = _loopback(host)
        self.port = port
        self.lifetime = lifetime
        low, high = delay_range
        if not 0 <= low <= high <= MAX_DELAY:
            raise ValueError(f"delay_range must lie within 0..{MAX_DELAY} s: {delay_range}")
        self.delay_range = (float(low), float(high))
        self.drop_methods = tuple(drop_methods)
        self.rng = random.Random(seed)
        self.mode = "pass"
        self.p = {"reset": 0.0, "delay": 0.0, "drop_response": 0.0}
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        #: (monotonic time, mode, details) of every mode change, for reports.
        self.timeline: list[tuple[float, str, str]] = []
        self._conns: set[_Conn] = set()
        self._blackhole_until = 0.0
        self._refusing = False
        self._outage_timer: asyncio.TimerHandle | None = None
        self._revert_timer: asyncio.TimerHandle | None = None
        self._server: asyncio.base_events.Server | None = None
        self._placeholder: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------------ public API (any thread)

    @property
    def endpoint(self) -> str:
        """``http://HOST:PORT`` of the proxy (what clients should use)."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._thread_main, name="fault-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._start_error is not None:
            raise RuntimeError(f"the fault proxy did not start: {self._start_error}")
        if not self._ready.is_set():
            raise RuntimeError("the fault proxy did not start within 30 s")
        return self

    def stop(self) -> None:
        """Reset every connection, stop listening and end the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is not None and not self._stopped.is_set():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._shutdown)
        if thread is not None:
            thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._ready.is_set() and not self._stopped.is_set()

    def set_mode(self, mode: str, *, p: float | None = None, seconds: float | None = None) -> None:
        """Switch to ``mode`` (one of ``MODES``). ``p``: the probability per request for
        ``reset`` (default 0.1), ``delay`` (default 1) and ``drop_response`` (default 0.1).
        ``seconds``: required for ``blackhole`` and ``refuse`` (at most ``MAX_OUTAGE``);
        optional for the others (then back to ``pass``). Ends a black hole or refuse period
        still running."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if mode in ("blackhole", "refuse"):
            if seconds is None or not 0 < seconds <= MAX_OUTAGE:
                raise ValueError(f"{mode} needs 0 < seconds <= {MAX_OUTAGE}")
            self._call(lambda: self._begin_outage(mode, float(seconds)))
            return
        faults = {}
        if mode != "pass":
            default = 1.0 if mode == "delay" else 0.1
            faults[mode] = default if p is None else p
        self.set_faults(seconds=seconds, _mode=mode, **faults)

    def set_faults(
        self,
        *,
        reset: float = 0.0,
        delay: float = 0.0,
        drop_response: float = 0.0,
        seconds: float | None = None,
        _mode: str = "mixed",
    ) -> None:
        """Per-request probabilities of the three request faults at once (a request gets at
        most one of reset and drop_response; a delay may come on top). ``seconds``: back to
        ``pass`` after that long."""
        probs = {"reset": reset, "delay": delay, "drop_response": drop_response}
        for name, value in probs.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} probability must be within 0..1: {value}")
        if seconds is not None and not 0 < seconds <= self.lifetime:
            raise ValueError(f"seconds must be within 0..{self.lifetime}: {seconds}")
        if not any(probs.values()):
            _mode = "pass"
        detail = ", ".join(f"{k}={v:g}" for k, v in probs.items() if v)
        self._call(lambda: self._set_faults(_mode, probs, detail, seconds))

    def heal(self) -> None:
        """Back to ``pass`` now (ends a black hole or refuse period early)."""
        self.set_mode("pass")

    def counters(self) -> dict[str, int]:
        """What was injected and seen so far (see the module docstring)."""
        with self._counts_lock:
            return dict(self._counts)

    def faults_injected(self) -> int:
        counts = self.counters()
        return sum(counts.get(kind, 0) for kind in FAULT_KINDS)

    def wait_outage_over(self, timeout: float | None = None) -> bool:
        """Block until no black hole or refuse period runs (True), or ``timeout`` passed."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.mode in ("blackhole", "refuse"):
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(0.05)
        return True

    # ------------------------------------------------------------------ internals (loop thread)

    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += n

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the proxy's loop and return its result."""
        loop = self._loop
        if loop is None or not self.running:
            raise RuntimeError("the fault proxy is not running")

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(30)

    def _note(self, mode: str, detail: str = "") -> None:
        self.mode = mode
        self.timeline.append((time.monotonic(), mode, detail))

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._listen())
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            self._stopped.set()
            loop.close()
            return
        self._note("pass")
        loop.call_later(self.lifetime, self._shutdown)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._stopped.set()
            with contextlib.suppress(Exception):
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock

    async def _listen(self) -> None:
        sock = self._socket()
        try:
            sock.bind((self.host, self.port))
            sock.listen(256)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._handle, sock=sock)
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    def _shutdown(self) -> None:
        self._cancel_timers()
        self._note("stopped")
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        for conn in list(self._conns):
            self._drop(conn, reset=True)
        assert self._loop is not None
        self._loop.stop()

    def _cancel_timers(self) -> None:
        for timer in (self._outage_timer, self._revert_timer):
            if timer is not None:
                timer.cancel()
        self._outage_timer = self._revert_timer = None

    def _set_faults(
        self, mode: str, probs: dict[str, float], detail: str, seconds: float | None
    ) -> None:
        self._end_outage()
        self._cancel_timers()
        self.p = dict(probs)
        self._note(mode, detail)
        if seconds is not None and mode != "pass":
            assert self._loop is not None
            self._revert_timer = self._loop.call_later(
                seconds, lambda: self._set_faults("pass", dict.fromkeys(probs, 0.0), "", None)
            )

    def _begin_outage(self, mode: str, seconds: float) -> None:
        self._end_outage()
        self._cancel_timers()
        self.p = dict.fromkeys(self.p, 0.0)
        assert self._loop is not None
        if mode == "blackhole":
            self._blackhole_until = time.monotonic() + seconds
            self._count("blackhole_periods")
        else:
            self._count("refuse_periods")
            self._refusing = True
            if self._placeholder is None:
                # Hold the port with a bound socket that does not listen: SYNs get a RST.
                placeholder = self._socket()
                placeholder.bind((self.host, self.port))
                self._placeholder = placeholder
            if self._server is not None:
                self._server.close()
                self._server = None
            for conn in list(self._conns):
                self._count("refuse_resets")
                self._drop(conn, reset=True)
        self._note(mode, f"{seconds:g} s")
        self._outage_timer = self._loop.call_later(seconds, self._outage_over)

    def _outage_over(self) -> None:
        self._outage_timer = None
        self._end_outage()
        self._note("pass", "outage over")

    def _end_outage(self) -> None:
        if self.mode == "blackhole" or self._blackhole_until:
            self._blackhole_until = 0.0
            for conn in list(self._conns):
                if conn.poisoned:
                    self._drop(conn, reset=True)
        if self._refusing:
            self._refusing = False
            if self._server is None and self.running:
                assert self._loop is not None
                self._loop.create_task(self._relisten())

    async def _relisten(self) -> None:
        for _ in range(50):
            if self._server is not None or self._refusing or self._stopped.is_set():
                return
            try:
                await self._listen()
                return
            except OSError as exc:
                self._count("relisten_errors")
                last = exc
                await asyncio.sleep(0.1)
        print(f"fault proxy: could not listen again on {self.port}: {last}", file=sys.stderr)

    def _poison(self, conn: _Conn) -> None:
        if not conn.poisoned:
            conn.poisoned = True
            self._count("blackholed")

    def _blackholed(self) -> bool:
        return time.monotonic() < self._blackhole_until

    def _drop(self, conn: _Conn, *, reset: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        for writer in (conn.client, conn.server):
            (_reset if reset else _close)(writer)
        current = asyncio.current_task()
        for task in conn.tasks:
            if task is not current:
                task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(client=writer)
        if self._server is None:  # a connection accepted as a refuse period began
            _reset(writer)
            return
        self._conns.add(conn)
        self._count("connections")
        current = asyncio.current_task()
        if current is not None:
            conn.tasks.append(current)
        try:
            if self._blackholed():
                # A partition: the connect worked, nothing will ever answer.
                self._poison(conn)
                while not conn.closed and await reader.read(CHUNK):
                    pass
                return
            try:
                server_reader, server_writer = await asyncio.open_connection(*self.target)
            except OSError:
                self._count("upstream_connect_errors")
                return
            conn.server = server_writer
            if conn.closed:
                _close(server_writer)
                return
            upstream = asyncio.ensure_future(self._server_to_client(conn, server_reader))
            conn.tasks.append(upstream)
            await self._client_to_server(conn, reader)  # until the client closes
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            if not conn.closed:
                raise
        finally:
            self._drop(conn, reset=False)

    async def _client_to_server(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        assert conn.server is not None
        while not conn.closed:
            data = await reader.read(CHUNK)
            if not data:
                return
            if self._blackholed():
                self._poison(conn)
                continue
            if conn.turn != "client":  # a new request
                conn.turn = "client"
                conn.method = data.split(b" ", 1)[0]
                self._count("requests")
                self._plan(conn)
            if conn.plan == "reset_request":
                self._count("reset_request")
                await self._cut(conn, conn.server, data)
                return
            conn.server.write(data)
            await conn.server.drain()

    async def _cut(self, conn: _Conn, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Pass on half of ``data``, then reset both connections: an exchange cut midway."""
        if len(data) > 1:
            writer.write(data[: len(data) // 2])
            with contextlib.suppress(OSError):
                await asyncio.wait_for(writer.drain(), 5)
        await asyncio.sleep(0.01)
        self._drop(conn, reset=True)

    def _plan(self, conn: _Conn) -> None:
        rng, p = self.rng, self.p
        conn.plan = None
        conn.delay = 0.0
        if p["reset"] and rng.random() < p["reset"]:
            conn.plan = rng.choice(("reset_request", "reset_response"))
        elif (
            p["drop_response"]
            and conn.method in self.drop_methods
            and rng.random() < p["drop_response"]
        ):
            conn.plan = "drop_response"
        if p["delay"] and rng.random() < p["delay"]:
            conn.delay = rng.uniform(*self.delay_range)

    async def _server_to_client(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        try:
            while not conn.closed:
                data = await reader.read(CHUNK)
                if not data:
                    return
                if self._blackholed():
                    self._poison(conn)
                    continue
                if conn.turn == "client" and not data.startswith(b"HTTP/1.1 100 "):
                    # The first bytes of a response: the server has done the request's work.
                    conn.turn = "server"
                    self._count("responses")
                    if conn.plan == "drop_response":
                        self._count("drop_response")
                        self._drop(conn, reset=False)
                        return
                    if conn.plan == "reset_response":
                        self._count("reset_response")
                        await self._cut(conn, conn.client, data)
                        return
                    if conn.delay:
                        self._count("delay")
                        await asyncio.sleep(min(conn.delay, MAX_DELAY))
                        if self._blackholed():
                            self._poison(conn)
                            continue
                conn.client.write(data)
                await conn.client.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # The server closed (or failed): so does the client side.
            if not conn.closed:
                self._drop(conn, reset=False)


# --------------------------------------------------------------------------- command line


def _parse_schedule(text: str) -> list[tuple[str, float | None, float]]:
    """``mode:p:seconds`` or ``mode:seconds`` items, comma-separated."""
    phases: list[tuple[str, float | None, float]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        fields = item.split(":")
        mode = fields[0]
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} in {item!r}")
        if len(fields) == 3:
            phases.append((mode, float(fields[1]), float(fields[2])))
        elif len(fields) == 2:
            phases.append((mode, None, float(fields[1])))
        else:
            raise ValueError(f"expected mode:p:seconds or mode:seconds, not {item!r}")
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fault_proxy.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("target_port", type=int, help="port of the endpoint on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any)")
    parser.add_argument("--schedule", default="", help="e.g. reset:0.1:10,blackhole:15")
    parser.add_argument("--lifetime", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        phases = _parse_schedule(args.schedule)
    except ValueError as exc:
        parser.error(str(exc))
    with FaultProxy(
        ("127.0.0.1", args.target_port), port=args.port, seed=args.seed, lifetime=args.lifetime
    ) as proxy:
        print(f"listening: {proxy.endpoint} -> 127.0.0.1:{args.target_port}", flush=True)
        try:
            for mode, p, seconds in phases:
                print(f"{mode} p={p} for {seconds:g} s", flush=True)
                if mode in ("blackhole", "refuse"):
                    proxy.set_mode(mode, seconds=seconds)
                    proxy.wait_outage_over(seconds + 5)
                else:
                    proxy.set_mode(mode, p=p)
                    time.sleep(seconds)
            if phases:
                proxy.heal()
            else:
                while proxy.running:
                    time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        print(f"counters: {proxy.counters()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
