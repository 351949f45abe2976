"""What elastic workers send each other besides the exchange, as tensors and JSON only:
the *heal* (the live workers' state, to a worker that joins) and each sync's *proof* that
its members hold the run's secret. Nothing here is ever unpickled.

* :func:`encode` / :func:`decode`: a nest of dicts, lists and tuples of tensors, ints,
  floats, strings, bools and None (what :meth:`farsync.algorithms.diloco.DiLoCo.shared_state`
  and an exchange's record hold) as JSON metadata plus the raw bytes of each tensor; the
  receiver rebuilds it from the JSON and an allow-list of dtypes.
* :class:`SafeTransport`: torchft's ``CheckpointTransport`` over the quorum's process
  group with that encoding (it replaces torchft's ``PGTransport``, which unpickles what a
  peer sends). With a secret, the joining worker first proves it (an HMAC over the step,
  its worker id and a fresh nonce), and the live worker's reply carries an HMAC over its
  header, the metadata and every tensor byte, bound to that nonce: checked before the
  metadata is parsed (the header part) and before anything received is used (the rest).
* :func:`prove_members`: each member of a sync sends an HMAC over (its worker id, the
  sync's round, torchft's step, the members' ids) beside the ids the members already swap;
  every member checks every peer's.

A secret is any bytes of at least :data:`MIN_SECRET` (``elastic.secret_file`` or
``$FARSYNC_ELASTIC_SECRET``). Nothing is encrypted: anyone on the path can read θ_g and
the pseudo-gradients; without the secret they cannot take part in a sync or a heal.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from datetime import timedelta

import torch

SECRET_ENV = "FARSYNC_ELASTIC_SECRET"
MIN_SECRET = 16
MAGIC = b"FSH1"
#: the dtypes a heal may carry (what DiLoCo's state holds, and a little more)
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}
#: the most JSON metadata a heal may announce (the tensors' bytes are bounded by the HMAC)
MAX_META = 256 << 20
#: a heal's first message (request, header) is received into a buffer this large: gloo
#: aborts the process on a message longer than its buffer, so a foreign peer's first
#: message (torchft's PGTransport sends a pickle there) is received whole and refused
FIRST = 64 << 10

_REQ = struct.Struct("<4sBxxxqq16s32s")  # magic, has secret, step, worker, nonce, HMAC
_HEAD = struct.Struct("<4sBBxxqqqqq")  # magic, status, has secret, step, worker, meta bytes, tensor bytes, tensors
OK, REFUSED, NO_SECRET = 0, 1, 2
TAG_REQ, TAG_HEAD, TAG_META, TAG_MAC1, TAG_MAC2, TAG_TENSOR = 1, 2, 3, 4, 5, 16


class AuthError(RuntimeError):
    """A peer failed to prove the run's secret, or sent what is not farsync's (one line,
    naming the peer). ``fatal``: this worker cannot go on (it was refused, or the state it
    needs failed the check); otherwise the sync is redone without that peer."""

    def __init__(self, message: str, *, fatal: bool):
        super().__init__(message)
        self.fatal = fatal


def load_secret(path: str = "") -> bytes | None:
    """The run's secret: the bytes of ``path`` (``elastic.secret_file``, trailing newline
    dropped), else ``$FARSYNC_ELASTIC_SECRET``, else None (no authentication). ValueError
    for a missing, unreadable or short one."""
    if path:
        try:
            with open(path, "rb") as f:
                secret = f.read().rstrip(b"\r\n")
        except OSError as e:
            raise ValueError(f"elastic.secret_file: cannot read {path!r} ({e.strerror})") from None
        where = f"elastic.secret_file {path!r}"
    else:
        env = os.environ.get(SECRET_ENV, "")
        if not env:
            return None
        secret, where = env.encode(), f"${SECRET_ENV}"
    if len(secret) < MIN_SECRET:
        raise ValueError(f"{where}: the elastic secret must be at least {MIN_SECRET} bytes (got {len(secret)})")
    return secret


def _mac(key: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, b"farsync-elastic-v1", hashlib.sha256)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.digest()


# ---- the encoding --------------------------------------------------------------------

def encode(obj) -> tuple[bytes, list[torch.Tensor]]:
    """(JSON metadata, tensors as contiguous CPU uint8) of ``obj``; TypeError for a leaf
    that is none of tensor, int, float, str, bool, None."""
    tensors: list[torch.Tensor] = []

    def enc(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            if str(t.dtype).removeprefix("torch.") not in DTYPES:
                raise TypeError(f"a heal cannot carry a tensor of dtype {t.dtype}")
            tensors.append(t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8))
            return {"T": len(tensors) - 1, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, dict):
            return {"D": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"U": [enc(v) for v in x]}
        if isinstance(x, list):
            return {"L": [enc(v) for v in x]}
        raise TypeError(f"a heal cannot carry a {type(x).__name__}")

    meta = json.dumps(enc(obj), separators=(",", ":")).encode()
    return meta, tensors


def tensor_specs(meta) -> list[tuple[torch.dtype, list[int], int]]:
    """(dtype, shape, bytes) of every tensor ``meta`` (parsed JSON) announces, in order;
    ValueError if it is not what :func:`encode` writes."""
    specs: dict[int, tuple[torch.dtype, list[int], int]] = {}

    def walk(x):
        if isinstance(x, dict):
            if set(x) == {"T", "dtype", "shape"}:
                i, dtype, shape = x["T"], DTYPES.get(x["dtype"]), x["shape"]
                if dtype is None or not isinstance(i, int) or i in specs or not isinstance(shape, list) \
                        or not all(isinstance(n, int) and n >= 0 for n in shape):
                    raise ValueError("a bad tensor entry")
                numel = 1
                for n in shape:
                    numel *= n
                specs[i] = (dtype, shape, numel * torch.empty(0, dtype=dtype).element_size())
            elif set(x) == {"D"}:
                for pair in x["D"]:
                    if not isinstance(pair, list) or len(pair) != 2:
                        raise ValueError("a bad dict entry")
                    walk(pair[0]), walk(pair[1])
            elif set(x) in ({"U"}, {"L"}):
                for v in next(iter(x.values())):
                    walk(v)
            else:
                raise ValueError("an unknown entry")
        elif not (x is None or isinstance(x, (bool, int, float, str))):
            raise ValueError("an unknown leaf")

    walk(meta)
    if sorted(specs) != list(range(len(specs))):
        raise ValueError("tensor entries out of order")
    return [specs[i] for i in range(len(specs))]


def decode(meta, tensors: list[torch.Tensor]):
    """The object :func:`encode` made, from its parsed metadata and the received uint8
    tensors (checked against it by :func:`tensor_specs`)."""
    specs = tensor_specs(meta)

    def dec(x):
        if isinstance(x, dict):
            if "T" in x:
                dtype, shape, _ = specs[x["T"]]
                raw = tensors[x["T"]]
                return (raw.view(dtype) if raw.numel() else torch.empty(0, dtype=dtype)).reshape(shape)
            if "D" in x:
                out = {}
                for k, v in x["D"]:
                    k = dec(k)
                    if not isinstance(k, (str, int, float, bool, tuple)) and k is not None:
                        raise ValueError("a dict key that is not plain data")
                    out[k] = dec(v)
                return out
            if "U" in x:
                return tuple(dec(v) for v in x["U"])
            return [dec(v) for v in x["L"]]
        return x

    return dec(meta)


# ---- the heal --------------------------------------------------------------------------

class SafeTransport:
    """torchft's checkpoint transport for farsync's heals (see the module docstring):
    it implements ``torchft.checkpointing.CheckpointTransport`` (which torchft only calls,
    never checks; not subclassed, so that importing farsync does not import torchft):
    over ``pg`` (the quorum's group), as tensors and JSON, authenticated with ``secret``
    when there is one. ``worker``: this worker's id (named in the other side's errors).

    torchft calls :meth:`send_checkpoint` on the live worker and :meth:`recv_checkpoint`
    on the joining one, inside ``Manager.start_quorum``, and swallows what they raise (a
    failed heal is a failed quorum); the refusal is kept in :attr:`refused` for
    :class:`~farsync.comm.elastic.ElasticCommunicator` to raise."""

    def __init__(self, pg, timeout: timedelta, worker: int, secret: bytes | None = None):
        self._pg, self._timeout, self.worker, self._secret = pg, timeout, worker, secret
        self.refused: AuthError | None = None

    def take_refusal(self) -> AuthError | None:
        r, self.refused = self.refused, None
        return r

    def metadata(self) -> str:
        return f"farsync-heal-v1 worker={self.worker}"

    def disallow_checkpoint(self) -> None:
        pass

    def shutdown(self, wait: bool = True) -> None:
        pass

    def _fail(self, message: str, *, fatal: bool) -> AuthError:
        self.refused = AuthError(message, fatal=fatal)
        return self.refused

    # the live worker
    def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict, timeout: timedelta) -> None:
        meta, tensors = encode(state_dict)
        for dst in dst_ranks:
            self._send_one(dst, step, meta, tensors, timeout)

    def _send_one(self, dst: int, step: int, meta: bytes, tensors: list[torch.Tensor], timeout: timedelta) -> None:
        req = torch.zeros(FIRST, dtype=torch.uint8)
        self._pg.recv([req], dst, TAG_REQ).wait(timeout)
        magic, has, their_step, their_worker, nonce, tag = _REQ.unpack(bytes(req[:_REQ.size].numpy()))
        peer = f"worker {their_worker} (quorum rank {dst})"
        status = OK
        if magic != MAGIC or their_step != step:
            status, why = REFUSED, f"{peer} asked for the state in a form that is not farsync's (a foreign peer?)"
        elif self._secret is not None and not has:
            status, why = REFUSED, f"{peer} asked for the run's state without proving the elastic secret"
        elif self._secret is not None and not hmac.compare_digest(
                tag, _mac(self._secret, b"heal-request", struct.pack("<qq", step, their_worker), nonce)):
            status, why = REFUSED, f"{peer} asked for the run's state with a proof of another elastic secret"
        elif self._secret is None and has:
            status, why = NO_SECRET, f"{peer} requires an elastic secret and this worker has none"
        total = sum(t.numel() for t in tensors)
        send_meta = status == OK
        head = _HEAD.pack(MAGIC, status, int(self._secret is not None), step, self.worker,
                          len(meta) if send_meta else 0, total if send_meta else 0, len(tensors) if send_meta else 0)
        h = hmac.new(self._secret, b"farsync-elastic-v1 heal", hashlib.sha256) if self._secret else None
        if h is not None:
            h.update(nonce)
            h.update(head)
        proof = h.copy().digest() if h is not None else bytes(32)  # the header's own, checked before anything else
        works = [self._pg.send([torch.frombuffer(bytearray(head + proof), dtype=torch.uint8)], dst, TAG_HEAD)]
        if not send_meta:
            for w in works:
                w.wait(timeout)
            raise self._fail(f"refused {why} (elastic.secret_file / ${SECRET_ENV}); redoing the sync without it"
                             if status == REFUSED else f"{why}: set the same elastic.secret_file (or ${SECRET_ENV}) on "
                             "every worker", fatal=False)  # the joining worker learns it and stops
        if h is not None:
            h.update(meta)
        if meta:
            works.append(self._pg.send([torch.frombuffer(bytearray(meta), dtype=torch.uint8)], dst, TAG_META))
        mac1 = h.copy().digest() if h is not None else bytes(32)
        works.append(self._pg.send([torch.frombuffer(bytearray(mac1), dtype=torch.uint8)], dst, TAG_MAC1))
        for w in works:
            w.wait(timeout)
        for i, t in enumerate(tensors):
            if h is not None:
                h.update(t.numpy())
            if t.numel():
                self._pg.send([t], dst, TAG_TENSOR + i).wait(timeout)
        mac2 = h.digest() if h is not None else bytes(32)
        self._pg.send([torch.frombuffer(bytearray(mac2), dtype=torch.uint8)], dst, TAG_MAC2).wait(timeout)

    # the joining worker
    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta):
        claimed = metadata.rsplit("worker=", 1)[-1] if metadata.startswith("farsync-heal-v1 worker=") else "?"
        peer = f"worker {claimed} (quorum rank {src_rank})"
        if not metadata.startswith("farsync-heal-v1 "):
            raise self._fail(f"refused the state {peer} offered: it is not farsync's heal (a foreign peer?); "
                             "nothing of it was used", fatal=True)
        nonce = os.urandom(16)
        tag = _mac(self._secret, b"heal-request", struct.pack("<qq", step, self.worker), nonce) if self._secret else bytes(32)
        req = _REQ.pack(MAGIC, int(self._secret is not None), step, self.worker, nonce, tag)
        sent = self._pg.send([torch.frombuffer(bytearray(req), dtype=torch.uint8)], src_rank, TAG_REQ)
        try:
            first = torch.zeros(FIRST, dtype=torch.uint8)
            self._pg.recv([first], src_rank, TAG_HEAD).wait(timeout)
            head, proof = bytes(first[:_HEAD.size].numpy()), bytes(first[_HEAD.size:_HEAD.size + 32].numpy())
            magic, status, has, their_step, their_worker, n_meta, n_bytes, n_tensors = _HEAD.unpack(head)
            if magic != MAGIC or their_step != step:
                raise ValueError("its first message is not farsync's heal header")
            h = hmac.new(self._secret, b"farsync-elastic-v1 heal", hashlib.sha256) if self._secret else None
            if h is not None:
                h.update(nonce)
                h.update(head)
                if has and not hmac.compare_digest(proof, h.copy().digest()):
                    raise self._fail(f"the state {peer} offered fails the elastic secret's check: refused, nothing of "
                                     "it used (another secret, or not one of this run's workers)", fatal=True)
            peer = f"worker {their_worker} (quorum rank {src_rank})"
            if status == REFUSED:
                raise self._fail(f"{peer} refused this worker: it holds another elastic secret, or none "
                                 f"(elastic.secret_file / ${SECRET_ENV})", fatal=True)
            if status == NO_SECRET:
                raise self._fail(f"{peer} runs without an elastic secret, and this worker requires one: refused its "
                                 "state", fatal=True)
            if status != OK:
                raise ValueError("an unknown status")
            if self._secret is not None and not has:
                raise self._fail(f"{peer} sent the run's state without proving the elastic secret: refused, nothing "
                                 "of it used", fatal=True)
            if not 0 <= n_meta <= MAX_META or n_bytes < 0 or n_tensors < 0:
                raise ValueError("its header announces impossible sizes")
            meta_t = torch.empty(n_meta, dtype=torch.uint8)
            mac1_t = torch.empty(32, dtype=torch.uint8)
            works = ([self._pg.recv([meta_t], src_rank, TAG_META)] if n_meta else []) + \
                [self._pg.recv([mac1_t], src_rank, TAG_MAC1)]
            for w in works:
                w.wait(timeout)
            meta = bytes(meta_t.numpy())
            if h is not None:
                h.update(meta)
                if not hmac.compare_digest(bytes(mac1_t.numpy()), h.copy().digest()):
                    raise self._fail(f"the state {peer} sent fails the elastic secret's check: refused, nothing of "
                                     "it used (another secret, or not one of this run's workers)", fatal=True)
            try:
                parsed = json.loads(meta.decode("utf-8"))
                specs = tensor_specs(parsed)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"its metadata is not JSON ({type(e).__name__})") from None
            if len(specs) != n_tensors or sum(b for _, _, b in specs) != n_bytes:
                raise ValueError("its metadata does not match its header")
            received = []
            for i, (_, _, nbytes) in enumerate(specs):
                buf = torch.empty(nbytes, dtype=torch.uint8)
                if nbytes:
                    self._pg.recv([buf], src_rank, TAG_TENSOR + i).wait(timeout)
                if h is not None:
                    h.update(buf.numpy())
                received.append(buf)
            mac2_t = torch.empty(32, dtype=torch.uint8)
            self._pg.recv([mac2_t], src_rank, TAG_MAC2).wait(timeout)
            if h is not None and not hmac.compare_digest(bytes(mac2_t.numpy()), h.digest()):
                raise self._fail(f"the state {peer} sent fails the elastic secret's check: refused, nothing of it "
                                 "used (changed on the way, or another secret)", fatal=True)
            return decode(parsed, received)
        except AuthError:
            raise
        except ValueError as e:
            raise self._fail(f"refused the state {peer} sent: {e} (a foreign or malicious peer?); nothing of it "
                             "was used", fatal=True) from None
        except RuntimeError as e:  # gloo: a message of another size than farsync's (not farsync's heal), or gone
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            if "ize" in first or "length" in first:
                raise self._fail(f"refused the state {peer} sent: its messages are not farsync's heal ({first}); "
                                 "nothing of it was used", fatal=True) from None
            raise
        finally:
            try:
                sent.wait(timedelta(seconds=1))
            except Exception:
                pass


# ---- a sync's members prove the secret ---------------------------------------------------

def prove_members(transport, worker: int, round, step: int, secret: bytes | None) -> list[int]:
    """The worker ids of this sync's members (what they swap), each member having proved
    ``secret``: an HMAC over (its id, ``round``, torchft's ``step``, the ids) checked by
    every member. AuthError naming the peer otherwise: fatal when this worker is the one
    that fails (it has no secret while the others have one, or its proof matches none of
    theirs), else the sync is redone without that peer."""
    me = transport.rank
    got = transport.all_gather(torch.tensor([worker, int(secret is not None)], dtype=torch.int64))
    ids = [int(x[0]) for x in got]
    flags = [bool(x[1]) for x in got]
    if secret is None and any(flags):
        raise AuthError(f"workers {[ids[j] for j, f in enumerate(flags) if f]} prove an elastic secret and this worker "
                        f"has none: start it with the run's elastic.secret_file (or ${SECRET_ENV})", fatal=True)
    if secret is None:
        return ids
    lacking = [ids[j] for j, f in enumerate(flags) if not f]
    if lacking:
        raise AuthError(f"refused worker {lacking[0]} in sync {_tag(round)}: it proves no elastic secret (started "
                        f"without elastic.secret_file / ${SECRET_ENV}); redoing the sync without it", fatal=False)
    body = json.dumps([_tag(round), step, ids]).encode()
    mine = _mac(secret, b"sync", struct.pack("<q", worker), body)
    tags = transport.all_gather(torch.frombuffer(bytearray(mine), dtype=torch.uint8))
    bad = [ids[j] for j in range(len(ids)) if j != me and not hmac.compare_digest(
        bytes(tags[j].numpy()), _mac(secret, b"sync", struct.pack("<q", ids[j]), body))]
    if bad and len(bad) == len(ids) - 1:
        raise AuthError(f"this worker's elastic secret matches none of the other workers' ({bad}) in sync "
                        f"{_tag(round)}: start it with the run's elastic.secret_file (or ${SECRET_ENV})", fatal=True)
    if bad:
        raise AuthError(f"refused worker {bad[0]} in sync {_tag(round)}: its proof of the elastic secret does not "
                        "match (another secret, or not one of this run's workers); redoing the sync without it",
                        fatal=False)
    return ids


def _tag(round) -> list | None:
    return None if round is None else list(round)
