"""A userspace link emulator: a TCP relay on loopback that adds delay and a rate limit.

This machine's kernel has no ``sch_netem``, so the benchmark models the network between a
client and its server with this relay instead. Each accepted connection is forwarded to one
target address. Both directions of every connection pass through one shared :class:`Link`,
which models a single access link:

- **rate**: each direction has its own serializer (a token bucket one piece deep) shared by
  all connections, so N parallel downloads share the link's rate exactly as they would on a
  real wire. Payload bytes are counted against the rate; TCP/IP header overhead is not.
- **delay**: every byte arrives ``rtt / 2`` after it finished serializing, in each direction.
- **connection set-up**: a TCP handshake costs one round trip before the client's first byte
  can leave, so the relay holds client data until ``rtt`` after accepting the connection.
  (The client's ``connect()`` itself returns at once: loopback completes the handshake.)

Not modelled: TCP slow start, loss, reordering, header overhead. A receiver that stops reading
stalls only its own connection (each direction's queue is bounded).

Counters (bytes in each direction, connections) are kept for the benchmark's "bytes over the
link" column. The relay runs an asyncio loop on a background thread, so a synchronous program
can use it as a context manager::

    with Relay(target=("127.0.0.1", 8080), link=LinkProfile(rate_bps=100e6, rtt=0.020)) as r:
        url = f"http://127.0.0.1:{r.port}/file"
        ...
        print(r.counters())

Run ``python relay.py --help`` for a standalone relay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from types import TracebackType

__all__ = ["LINKS", "Counters", "Link", "LinkProfile", "Relay", "parse_rate"]

READ_SIZE = 64 * 1024
#: Serialization granularity: a read is split into pieces of at most this many bytes, so
#: connections sharing the link interleave finely (16 KiB take 1.3 ms at 100 Mbit/s).
PIECE_SIZE = 16 * 1024
#: Pieces queued per direction of one connection before its reader stops reading.
QUEUE_PIECES = 256
#: Depth of each direction's token bucket, in seconds of the link's rate. The event loop's
#: timers overshoot by about a millisecond; without a little depth those overshoots would be
#: lost link time (a 100 Mbit/s link measured 57 Mbit/s with none).
BUCKET_SECONDS = 0.005
START_TIMEOUT = 10.0
RELAY_NICE = -10


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinkProfile:
    """A link's rate (bits per second, each direction) and round-trip time (seconds)."""

    rate_bps: float
    rtt: float
    name: str = ""

    @property
    def rate_bytes(self) -> float:
        return self.rate_bps / 8

    @property
    def label(self) -> str:
        return self.name or f"{self.rate_bps / 1e6:g}Mbit-{self.rtt * 1000:g}ms"


LINKS: dict[str, LinkProfile] = {
    "100mbit": LinkProfile(name="100mbit", rate_bps=100e6, rtt=0.020),
    "20mbit": LinkProfile(name="20mbit", rate_bps=20e6, rtt=0.080),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Counters:
    """Payload bytes that crossed the link and connections opened."""

    bytes_down: int = 0  # server -> client
    bytes_up: int = 0  # client -> server
    connections: int = 0

    @property
    def bytes_total(self) -> int:
        return self.bytes_down + self.bytes_up


class _Serializer:
    """One direction of the link: pieces leave one after another at the link's rate.

    A token bucket ``BUCKET_SECONDS`` deep: an idle link saves up at most that much sending
    time, so a late timer does not waste the link, and no burst outruns the rate by more.
    """

    def __init__(self, rate_bytes: float) -> None:
        self._rate = rate_bytes
        self._free_at = 0.0
        self.bytes = 0

    def reserve(self, size: int, now: float) -> float:
        """Book ``size`` bytes on the wire; return the time their last bit has left."""
        start = max(now - BUCKET_SECONDS, self._free_at)
        self._free_at = start + size / self._rate
        self.bytes += size
        return max(self._free_at, now)  # saved-up time speeds a burst, never the delay


class Link:
    """A shared link: one serializer per direction and a fixed one-way delay."""

    def __init__(self, profile: LinkProfile) -> None:
        self.profile = profile
        self.one_way = profile.rtt / 2
        self.down = _Serializer(profile.rate_bytes)
        self.up = _Serializer(profile.rate_bytes)
        self.connections = 0

    def counters(self) -> Counters:
        return Counters(
            bytes_down=self.down.bytes, bytes_up=self.up.bytes, connections=self.connections
        )

    def reset(self) -> None:
        self.down.bytes = 0
        self.up.bytes = 0
        self.connections = 0


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    wire: _Serializer,
    one_way: float,
    not_before: float,
) -> None:
    """Copy one direction: serialize each piece, then deliver it ``one_way`` later."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_PIECES)

    async def send() -> None:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                await queue.put(None)
                return
            for offset in range(0, len(data), PIECE_SIZE):
                piece = data[offset : offset + PIECE_SIZE]
                now = max(loop.time(), not_before)
                left_at = wire.reserve(len(piece), now)
                # Hold the reader until the piece is on the wire: the serializer, not the
                # queue, is what paces this connection against the others.
                await asyncio.sleep(max(0.0, left_at - loop.time()))
                await queue.put((left_at + one_way, piece))

    async def deliver() -> None:
        while True:
            item = await queue.get()
            if item is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            arrive_at, piece = item
            await asyncio.sleep(max(0.0, arrive_at - loop.time()))
            writer.write(piece)
            await writer.drain()

    async with asyncio.TaskGroup() as group:
        group.create_task(send())
        group.create_task(deliver())


class Relay:
    """A TCP relay on a loopback port that forwards to ``target`` through a :class:`Link`."""

    def __init__(
        self,
        *,
        target: tuple[str, int],
        link: LinkProfile,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target = target
        self.link = Link(link)
        self._listen = (listen_host, listen_port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Relay:
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("relay did not start")
        if self._error is not None:
            raise RuntimeError(f"relay failed to start: {self._error}") from self._error
        return self

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(START_TIMEOUT)

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def counters(self) -> Counters:
        return self.link.counters()

    def reset_counters(self) -> None:
        if self._loop is None:
            self.link.reset()
        else:
            done = threading.Event()

            def reset() -> None:
                self.link.reset()
                done.set()

            self._loop.call_soon_threadsafe(reset)
            done.wait(START_TIMEOUT)

    # -- the loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # not root: keep the default priority
            # Only this thread: a busy machine must not slow the emulated link, while the
            # processes the benchmark starts (from other threads) keep the normal priority.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RELAY_NICE)
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        connections: set[asyncio.Task[None]] = set()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            try:
                await self._handle(reader, writer)
            except asyncio.CancelledError:
                # Shutting down. asyncio's stream callback calls task.exception() on this
                # task, which raises (and logs a traceback) if the task ends cancelled.
                pass
            finally:
                connections.discard(task)

        server = await asyncio.start_server(on_connect, *self._listen)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            for task in list(connections):
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        accepted = loop.time()
        self.link.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    _pump(
                        client_reader,
                        server_writer,
                        self.link.up,
                        self.link.one_way,
                        accepted + self.link.profile.rtt,
                    )
                )
                group.create_task(
                    _pump(server_reader, client_writer, self.link.down, self.link.one_way, 0.0)
                )
        except* (ConnectionError, OSError):
            pass  # a peer reset: close both sides below, as a real link would
        finally:
            for writer in (client_writer, server_writer):
                writer.close()
            for writer in (client_writer, server_writer):
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()


# -- command line --------------------------------------------------------------------------


def parse_rate(text: str) -> float:
    """'100M', '20Mbit', '1.5G', '800k' → bits per second."""
    value = text.strip().lower().removesuffix("bit/s").removesuffix("bit").removesuffix("bps")
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(value[-1:], 1.0)
    if value[-1:] in "kmg":
        value = value[:-1]
    return float(value) * scale


def _parse_duration(text: str) -> float:
    value = text.strip().lower()
    if value.endswith("ms"):
        return float(value[:-2]) / 1000
    return float(value.removesuffix("s"))


@contextlib.contextmanager
def _standalone(args: argparse.Namespace) -> Iterator[Relay]:
    host, _, port = args.target.rpartition(":")
    profile = LinkProfile(rate_bps=parse_rate(args.rate), rtt=_parse_duration(args.rtt))
    with Relay(target=(host, int(port)), link=profile, listen_port=args.port) as relay:
        yield relay


def main() -> None:
    parser = argparse.ArgumentParser(description="TCP relay adding delay and a rate limit.")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--port", type=int, default=0, help="loopback port to listen on")
    parser.add_argument("--rate", default="100M", help="link rate per direction, bits/s")
    parser.add_argument("--rtt", default="20ms", help="round-trip time added")
    args = parser.parse_args()
    with _standalone(args) as relay:
        print(f"listening on 127.0.0.1:{relay.port}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print(relay.counters())


if __name__ == "__main__":
    main()
