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
  TTL): connect, handshake and reply included.
"""

from __future__ import annotations

import json
import os
import socket
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge

#: bytes a Unix socket's path may have (sun_path is 108, the last one NUL)
MAX_SOCKET_PATH = 107
#: the largest JSON header accepted (the farsync config travels in it)
MAX_HEADER = 4 << 20


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


def listen(state_dir: str, client: int) -> Listener:
    """The trainer's end: a new authkey and a listening socket in ``state_dir``. A socket
    left by a trainer that died is replaced; one a live trainer answers on is not
    (RuntimeError)."""
    path = socket_path(state_dir, client)
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"the trainer's socket {path} is {len(path.encode())} bytes long; a Unix socket's path "
                         f"may have {MAX_SOCKET_PATH}: give a shorter --state-dir")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # its trainer is gone
        else:
            raise RuntimeError(f"a trainer for client {client} already listens on {path}")
        finally:
            probe.close()
    key = os.urandom(32)
    tmp = key_path(state_dir, client) + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(key)
    os.replace(tmp, key_path(state_dir, client))
    listener = Listener(path, family="AF_UNIX", authkey=key)
    os.chmod(path, 0o600)
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
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout_s)
        s.connect(path)
        s.settimeout(None)  # Connection reads the descriptor blocking; waits are bounded by poll below
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        raise NoTrainer(f"{where} listens on {path}: {start_hint(state_dir, client)}") from None
    except OSError:
        s.close()
        raise
    conn = Connection(s.detach())
    try:
        # the trainer speaks first (its challenge) once it accepts: it may be training another message
        if not conn.poll(timeout_s):
            raise TimeoutError(f"the trainer for client {client} at {path} did not take the message "
                               f"within {timeout_s:.1f} s (the round's deadline)")
        answer_challenge(conn, key)
        deliver_challenge(conn, key)
    except AuthenticationError:
        conn.close()
        raise AuthenticationError(f"the trainer for client {client} at {path} refused this relay's key "
                                  f"{key_path(state_dir, client)} (a trainer started since it was read?)") from None
    except (EOFError, ConnectionError):
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
    (time.time()); TimeoutError after it, EOFError if the other end went away."""

    def frame(limit: int | None = None) -> bytes:
        if not conn.poll(max(0.0, deadline - time.time())):
            raise TimeoutError(f"{what} did not come by the round's deadline")
        return conn.recv_bytes(limit)

    header = json.loads(frame(MAX_HEADER))
    n = header.pop("objects")
    if not n:
        return header, None
    from flwr.supercore.inflatable.inflatable_object import get_object_id
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, validate_object_content

    contents, root = {}, None
    for _ in range(n):
        b = frame()
        validate_object_content(b)
        root = get_object_id(b)
        contents[root] = b
    return header, inflate_object_from_contents(root, contents)


def request(state_dir: str, client: int, header: dict, content, timeout_s: float) -> tuple[dict, object]:
    """The relay's whole exchange: send the message, wait for the answer, both within
    ``timeout_s``; (answer header, answer RecordDict). An answer with an error (one line
    from the trainer) is a RuntimeError."""
    deadline = time.time() + timeout_s
    conn = connect(state_dir, client, timeout_s)
    try:
        send(conn, header, content)
        try:
            answer, out = receive(conn, deadline, f"the reply of client {client}'s trainer")
        except TimeoutError as e:
            raise TimeoutError(f"{e} ({timeout_s:.1f} s)") from None
        except EOFError:
            raise RuntimeError(f"the trainer for client {client} closed the channel before replying "
                               f"(it stopped? {start_hint(state_dir, client)})") from None
    finally:
        conn.close()
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return answer, out


def ping(state_dir: str, client: int, timeout_s: float) -> dict:
    """Whether the site's trainer answers (its answer); the errors of :func:`request`."""
    return request(state_dir, client, {"kind": "ping"}, None, timeout_s)[0]
