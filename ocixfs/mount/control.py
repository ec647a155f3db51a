"""The control channel between ``ocixfs`` commands and a running mount daemon.

Each daemon listens on a Unix socket named after its mountpoint, in the runtime directory
(``/run/ocixfs`` as root, else ``$XDG_RUNTIME_DIR/ocixfs`` or ``/tmp/ocixfs-<uid>``). That
directory is private: owned by the user, mode 0700 (made so, or refused if another user
owns it or may write to it), and every socket in it is mode 0600, whatever the umask. A
daemon's answers name the files root opened (the profile), so only its user may ask.
A client connects, sends one JSON object terminated by a newline (``{"cmd": "stats"}``),
and reads one JSON object terminated by a newline. Commands are registered by the daemon
as plain callables returning JSON-serialisable dicts; a failing handler answers
``{"error": "..."}``. The socket is the daemon's identity: ``ocixfs umount`` asks it for
the pid so that it can wait until the daemon has really exited.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ocixfs.errors import UnsafePathError, UsageError
from ocixfs.mount.runtime import mount_id, runtime_dir

if TYPE_CHECKING:
    import trio

__all__ = [
    "ControlServer",
    "ask",
    "ask_every_daemon",
    "request",
    "socket_path",
]

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 24
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


SOCKET_MODE = 0o600


def socket_path(mountpoint: Path) -> Path:
    return runtime_dir() / f"{mount_id(mountpoint)}.sock"


def request(mountpoint: Path, cmd: str, *, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Send ``cmd`` to the daemon serving ``mountpoint`` and return its answer.

    Raises ``UsageError`` when no daemon answers (not an ocixfs mount, or daemon gone).
    """
    try:
        answer = ask(socket_path(mountpoint), cmd, timeout=timeout, **args)
    except (FileNotFoundError, ConnectionRefusedError):
        raise UsageError(f"{mountpoint}: no ocixfs daemon serves this mountpoint") from None
    except OSError as exc:
        raise UsageError(f"{mountpoint}: cannot talk to the ocixfs daemon: {exc}") from None
    if "error" in answer:
        raise UsageError(f"{mountpoint}: {answer['error']}")
    return answer


def ask(path: Path, cmd: str, *, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Send ``cmd`` to the control socket at ``path`` and return its answer as is (an
    ``{"error": ...}`` answer included). Raises ``OSError`` (no daemon, a timeout) and
    ``ValueError`` (an answer that is not JSON)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = _read_line(sock)
    answer: dict[str, Any] = json.loads(data)
    return answer


_DAEMON_SOCKET = re.compile(r"[0-9a-f]{20}\.sock")  # mount_id(mountpoint) + ".sock"


def ask_every_daemon(
    cmd: str, *, timeout: float, fallback: str | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Ask every mount daemon of this user (its control socket in ``runtime_dir``; never
    another socket there) for ``cmd`` (``fallback`` where a daemon of an older ocixfs does
    not know it). Returns the answers of those that answered, and the sockets that took
    the connection but gave no answer within ``timeout``. A socket nobody listens on (a
    daemon that died) is left out."""
    answers: list[dict[str, Any]] = []
    unanswered: list[str] = []
    try:
        directory = runtime_dir()
        names = sorted(name for name in os.listdir(directory) if _DAEMON_SOCKET.fullmatch(name))
    except (OSError, UnsafePathError):
        return answers, unanswered
    for name in names:
        try:
            answer = ask(directory / name, cmd, timeout=timeout)
            if "error" in answer and fallback is not None:
                answer = ask(directory / name, fallback, timeout=timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            continue
        except (OSError, ValueError):
            unanswered.append(os.fspath(directory / name))
            continue
        if "error" not in answer:
            answers.append(answer)
    return answers, unanswered


def _read_line(sock: socket.socket) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        data = sock.recv(65536)
        if not data:
            break
        parts.append(data)
        total += len(data)
        if data.endswith(b"\n") or total > MAX_MESSAGE:
            break
    return b"".join(parts)


class ControlServer:
    """Serves control requests for one mount inside the daemon's trio run."""

    def __init__(self, mountpoint: Path) -> None:
        self.path = socket_path(mountpoint)
        self._handlers: dict[str, Handler] = {}

    def register(self, cmd: str, handler: Handler) -> None:
        self._handlers[cmd] = handler

    def bind(self) -> trio.socket.SocketType:
        """Create the listening socket (replacing a stale one), mode 0600 in the private
        runtime directory, before the mount goes live."""
        import trio

        self.path = runtime_dir(create=True) / self.path.name
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.path.unlink(missing_ok=True)
            sock.bind(os.fspath(self.path))
            os.chmod(self.path, SOCKET_MODE)  # nobody else can reach it meanwhile: 0700
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        return trio.socket.from_stdlib_socket(sock)

    async def serve(self, sock: trio.socket.SocketType) -> None:
        """Accept and answer requests until cancelled; remove the socket file at the end."""
        import trio

        listener = trio.SocketListener(sock)
        try:
            await trio.serve_listeners(self._handle, [listener])
        finally:
            with trio.CancelScope(shield=True):
                self.path.unlink(missing_ok=True)

    async def _handle(self, stream: trio.SocketStream) -> None:
        import trio

        async with stream:
            try:
                with trio.fail_after(10):
                    data = b""
                    while not data.endswith(b"\n") and len(data) < MAX_MESSAGE:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            break
                        data += chunk
                    answer = await self._dispatch(data)
                    await stream.send_all(json.dumps(answer).encode() + b"\n")
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception:  # one bad connection must not stop the control socket
                log.exception("control connection failed")

    async def _dispatch(self, data: bytes) -> dict[str, Any]:
        try:
            message = json.loads(data)
            handler = self._handlers[message["cmd"]]
        except (ValueError, KeyError, TypeError):
            return {"error": "unknown or malformed control request"}
        try:
            return await handler(message)
        except Exception as exc:  # a control request must never take the daemon down
            log.warning("control request %s failed: %s", message.get("cmd"), exc)
            return {"error": f"{type(exc).__name__}: {exc}"}
