"""Federated pre-training across organizations (Photon) on Flower.

:mod:`~farsync.federated.core` is the arithmetic (server, client, the in-process
simulation), :mod:`~farsync.federated.flower` the ServerApp and the ClientApp (a relay),
:mod:`~farsync.federated.messages` their messages, :mod:`~farsync.federated.rounds` the
server's round loop, :mod:`~farsync.federated.trainer` a client site's long-lived trainer
and :mod:`~farsync.federated.channel` the local channel the relay reaches it over,
:mod:`~farsync.federated.launch` and :mod:`~farsync.federated.demo` the processes;
`farsync federate` is the command line.
Needs ``pip install 'farsync[federated]'`` (Flower) for everything but ``core``.
"""
