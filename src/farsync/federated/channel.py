"""The local channel between a site's relay (the ClientApp Flower starts for every message,
:func:`farsync.federated.flower.client_train`) and its trainer (the long-lived process that
holds the model, :mod:`farsync.federated.trainer`). No torch here: the relay's process
never loads it.

* Where: a Unix socket ``STATE_DIR/trainer-K.sock`` (K: the site's client index) beside an
  authkey ``STATE_DIR/trainer-K.key`` (32 random bytes, mode 0600, written by the trainer
  when it starts). :mod:`multiprocessing.connection`'s challenge-response (an HMAC of the
  key, both ways) admits a relay that can read the key; one that cannot is refused.
* What: only ``send_bytes``/``recv_bytes`` (never ``send``/``recv``, which pickle). A
  request or an answer is a JSON header ``{..., "objects": n}`` and then n frames: the
  message's ``RecordDict`` as Flower itself carries it between its processes — its
  deflated objects (records, arrays, 5 MB array chunks: JSON and raw bytes), children
  before parents, the ``RecordDict`` last — rebuilt by Flower's own inflate. The relay
  never looks inside.
* How long: every wait is bounded. The relay gives up at the message's deadline (its
  TTL): connect, handshake and reply included. The trainer gives a connected relay
  :data:`HANDSHAKE_S` for each step of the handshake, then its own limits for the
  message and the answer; a read or write that makes no progress in time fails (a kernel
  timeout on the socket, ``SO_RCVTIMEO``/``SO_SNDTIMEO``), so a peer that freezes cannot
  hold the site.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import tempfile
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from multiprocessing.connection import Listener as _Listener

#: bytes a Unix socket's path may have (sun_path is 108, the last one NUL)
MAX_SOCKET_PATH = 107
#: the largest JSON header accepted (the farsync config travels in it)
MAX_HEADER = 4 << 20
#: connections a trainer busy with a message lets wait to be accepted
BACKLOG = 16
#: seconds a trainer gives a relay for each step of the handshake
HANDSHAKE_S = 10.0


class Listener:
    """The trainer's listening socket: :meth:`accept` hands back a relay's connection once
    the challenge-response (both ways) has passed, each of its reads and writes bounded."""

    def __init__(self, listener: _Listener, key: bytes):
        self._listener, self._key = listener, key
        self.address = listener.address

    def accept(self, timeout_s: float | None = None) -> Connection:
        """The next relay, authenticated; AuthenticationError, EOFError, ConnectionError,
        or TimeoutError when it does not finish the handshake within ``timeout_s`` a step
        (:data:`HANDSHAKE_S`)."""
        timeout_s = HANDSHAKE_S if timeout_s is None else timeout_s
        conn = self._listener.accept()  # no authkey on the inner listener: the handshake is here
        try:
            bound(conn, timeout_s)
            deliver_challenge(conn, self._key)
            answer_challenge(conn, self._key)
        except BlockingIOError:
            conn.close()
            raise TimeoutError(f"a relay did not finish the handshake within {timeout_s:g} s") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        self._listener.close()  # unlinks the socket


class NoTrainer(RuntimeError):
    """No trainer answers for this site (one line: where it was looked for, how to start it)."""


def socket_path(state_dir: str, client: int) -> str:
    return os.path.join(os.path.abspath(state_dir), f"trainer-{client}.sock")


def key_path(state_dir: str, client: int) -> str:
    return os.path.join(os.path.abspath(state_dir), f"trainer-{client}.key")


def start_hint(state_dir: str, client: int) -> str:
    d = os.path.abspath(state_dir)
    return (f"start this site with `farsync federate client --client {client} --state-dir {d} ...` "
            f"(trainer and SuperNode), or its trainer alone with `farsync federate trainer --client {client} "
            f"--state-dir {d}`")


def bound(conn: Connection, seconds: float) -> None:
    """Every read and write of ``conn`` fails (BlockingIOError) after ``seconds`` without
    progress: the kernel's SO_RCVTIMEO/SO_SNDTIMEO (Connection reads the descriptor
    blocking, so a Python socket timeout would not do)."""
    us = max(1000, int(seconds * 1e6))  # 0 would mean no limit
    tv = struct.pack("ll", us // 1_000_000, us % 1_000_000)
    s = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    finally:
        s.close()


def listen(state_dir: str, client: int) -> Listener:
    """The trainer's end: a new authkey and a listening socket in ``state_dir``. A socket
    left by a trainer that died is replaced; one a live trainer answers on (or a busy one
    whose queue is full) is not (RuntimeError). The key file is written once the socket
    is bound, so a trainer that loses a race to bind leaves the winner's key alone."""
    path = socket_path(state_dir, client)
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"the trainer's socket {path} is {len(path.encode())} bytes long; a Unix socket's path "
                         f"may have {MAX_SOCKET_PATH}: give a shorter --state-dir")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    busy = RuntimeError(f"a trainer for client {client} already listens on {path}")
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                os.unlink(path)  # its trainer is gone
            except FileNotFoundError:
                pass
        except (BlockingIOError, TimeoutError):  # its queue is full: alive, and busy
            raise busy from None
        else:
            raise busy
        finally:
            probe.close()
    key = os.urandom(32)
    try:
        inner = _Listener(path, family="AF_UNIX", backlog=BACKLOG)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:  # another trainer bound it since the probe
            raise busy from None
        raise
    listener = Listener(inner, key)
    try:
        os.chmod(path, 0o600)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".trainer-{client}.key.")  # 0600, O_EXCL
        try:
            with open(fd, "wb") as f:
                f.write(key)
            os.replace(tmp, key_path(state_dir, client))
        except BaseException:
            os.unlink(tmp)
            raise
    except BaseException:
        listener.close()
        raise
    return listener


def connect(state_dir: str, client: int, timeout_s: float) -> Connection:
    """The relay's end: a connection to the site's trainer, authenticated both ways within
    ``timeout_s``. :class:`NoTrainer` when none listens, :class:`TimeoutError` when it
    does not answer, :class:`AuthenticationError` when it refuses this relay's key."""
    path, where = socket_path(state_dir, client), f"no farsync trainer for client {client}"
    try:
        with open(key_path(state_dir, client), "rb") as f:
            key = f.read()
    except FileNotFoundError:
        raise NoTrainer(f"{where} (no {key_path(state_dir, client)}): {start_hint(state_dir, client)}") from None
    deadline = time.time() + timeout_s
    late = TimeoutError(f"the trainer for client {client} at {path} did not take the message "
                        f"within {timeout_s:.1f} s (the round's deadline)")
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(max(0.001, deadline - time.time()))
            s.connect(path)
            s.settimeout(None)  # Connection reads the descriptor blocking; its waits are bounded below
            break
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            raise NoTrainer(f"{where} listens on {path}: {start_hint(state_dir, client)}") from None
        except BlockingIOError:  # the trainer's queue is full (it is busy): ask again until the deadline
            s.close()
            if time.time() >= deadline:
                raise late from None
            time.sleep(min(0.05, max(0.0, deadline - time.time())))
        except TimeoutError:
            s.close()
            raise late from None
        except OSError:
            s.close()
            raise
    conn = Connection(s.detach())
    try:
        # the trainer speaks first (its challenge) once it accepts: it may be training another message
        if not conn.poll(max(0.0, deadline - time.time())):
            raise late
        bound(conn, max(0.001, deadline - time.time()))  # every read and write from here on
        answer_challenge(conn, key)
        deliver_challenge(conn, key)
    except AuthenticationError:
        conn.close()
        raise AuthenticationError(f"the trainer for client {client} at {path} refused this relay's key "
                                  f"{key_path(state_dir, client)} (a trainer started since it was read?)") from None
    except (BlockingIOError, TimeoutError):  # a read or write the deadline cut, or no challenge by it
        conn.close()
        raise late from None
    except (EOFError, OSError):  # OSError: an end of file inside a frame, a reset
        conn.close()
        raise RuntimeError(f"the trainer for client {client} at {path} closed the connection (it is stopping?): "
                           f"{start_hint(state_dir, client)}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def send(conn: Connection, header: dict, content=None) -> None:
    """``header`` (JSON) and ``content`` (a Flower RecordDict, or None) as frames."""
    objects = []
    if content is not None:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        objects = list(get_all_nested_objects(content).values())  # children first, the RecordDict last
    conn.send_bytes(json.dumps({**header, "objects": len(objects)}).encode())
    for obj in objects:
        conn.send_bytes(obj.deflate())


def receive(conn: Connection, deadline: float, what: str = "the message") -> tuple[dict, object]:
    """(header, RecordDict or None) from :func:`send`, all of it by ``deadline``
    (time.time()); TimeoutError after it, EOFError if the other end went away, OSError
    when it went away inside a frame, ValueError for frames that are not :func:`send`'s
    (the last one a RecordDict)."""
    late = TimeoutError(f"{what} did not come by the round's deadline")

    def frame(limit: int | None = None) -> bytes:
        left = deadline - time.time()
        if not conn.poll(max(0.0, left)):
            raise late
        bound(conn, max(0.001, left))  # a frame begun must end by the deadline too
        try:
            return conn.recv_bytes(limit)
        except BlockingIOError:
            raise late from None

    header = json.loads(frame(MAX_HEADER))
    if not isinstance(header, dict) or not isinstance(header.get("objects"), int) or header["objects"] < 0:
        raise ValueError(f"{what}: its header is not farsync's")
    n = header.pop("objects")
    if not n:
        return header, None
    from flwr.app import RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_object_id
    from flwr.supercore.inflatable.inflatable_utils import (get_object_head_values_from_object_content,
                                                             inflate_object_from_contents, validate_object_content)

    contents, root = {}, None
    for _ in range(n):
        b = frame()
        validate_object_content(b)
        root = get_object_id(b)
        contents[root] = b
    if get_object_head_values_from_object_content(contents[root])[0] != "RecordDict":
        raise ValueError(f"{what}: its last frame is not a RecordDict")
    try:
        out = inflate_object_from_contents(root, contents)
    except KeyError as e:
        raise ValueError(f"{what}: object {e} is missing from its frames") from None
    if not isinstance(out, RecordDict):
        raise ValueError(f"{what}: its last frame is not a RecordDict")
    return header, out


def request(state_dir: str, client: int, header: dict, content, timeout_s: float) -> tuple[dict, object]:
    """The relay's whole exchange: send the message, wait for the answer, both within
    ``timeout_s``; (answer header, answer RecordDict). An answer with an error (one line
    from the trainer) is a RuntimeError."""
    deadline = time.time() + timeout_s
    conn = connect(state_dir, client, timeout_s)
    what = f"the reply of client {client}'s trainer"
    try:
        try:
            send(conn, header, content)
            answer, out = receive(conn, deadline, what)
        except TimeoutError as e:
            raise TimeoutError(f"{e} ({timeout_s:.1f} s)") from None
        except BlockingIOError:  # the send: the trainer took the message and stopped reading it
            raise TimeoutError(f"{what} did not come by the round's deadline ({timeout_s:.1f} s)") from None
        except (EOFError, OSError) as e:  # OSError: gone inside a frame, or a reset
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise RuntimeError(f"the trainer for client {client} closed the channel before replying "
                               f"({why}; it stopped? {start_hint(state_dir, client)})") from None
        except ValueError as e:
            raise RuntimeError(f"client {client}'s trainer answered frames that are not farsync's: {e}") from None
    finally:
        conn.close()
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return answer, out


def ping(state_dir: str, client: int, timeout_s: float) -> dict:
    """Whether the site's trainer answers (its answer); the errors of :func:`request`."""
    return request(state_dir, client, {"kind": "ping"}, None, timeout_s)[0]
