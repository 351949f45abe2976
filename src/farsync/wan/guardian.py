"""Cleanup guardian: removes a run's namespaces when its `farsync wan` process dies.

`farsync wan` starts this as a small process of its own (a new session, so a Ctrl-C in
the terminal does not reach it) and keeps the write end of its stdin open. The kernel
closes that pipe whenever the owner exits — normally, on an exception, or on SIGKILL,
which no handler can catch — and the guardian then kills whatever still runs inside the
namespaces and deletes them. On a normal exit the owner has already cleaned up and the
guardian finds nothing to do. Only if the guardian itself is SIGKILLed too (or the
machine goes down) is ``farsync wan --cleanup`` needed.

    python -m farsync.wan.guardian fs-123-sw fs-123-h0 fs-123-h1
"""

from __future__ import annotations

import signal
import sys

from farsync.wan.netns import remove_namespaces


def main(names: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        sys.stdin.buffer.read()  # returns at EOF: the owner has exited, however it exited
    except OSError:
        pass
    remove_namespaces(names)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
