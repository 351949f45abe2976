"""Federated pre-training across organizations (Photon) on Flower.

:mod:`~farsync.federated.core` is the arithmetic (server, client, the in-process
simulation), :mod:`~farsync.federated.flower` the ServerApp/ClientApp and their messages,
:mod:`~farsync.federated.rounds` the server's round loop, :mod:`~farsync.federated.launch`
and :mod:`~farsync.federated.demo` the processes; `farsync federate` is the command line.
Needs ``pip install 'farsync[federated]'`` (Flower) for everything but ``core``.
"""
