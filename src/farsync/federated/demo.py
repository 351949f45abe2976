"""A whole federation on one machine: what `farsync federate demo` runs, and what the tests
and the benchmark build on (:class:`Federation`)."""

from __future__ import annotations

import os
import time

from farsync.federated import launch as L


class Federation:
    """A SuperLink (TLS + client keys unless ``secure`` is False) and client sites (each a
    trainer and a SuperNode) on this machine, in ``run_dir``/flower; :meth:`stop` ends them all."""

    def __init__(self, run_dir: str, *, port: int = 18000, secure: bool = True, host: str = "127.0.0.1",
                 prefix=None):
        self.run_dir = os.path.abspath(run_dir)
        self.port, self.secure, self.host = port, secure, host
        self.base = os.path.join(self.run_dir, "flower")
        self.logs = os.path.join(self.base, "logs")
        self.procs = L.Processes()
        # who -> command prefix: e.g. run the server and each client in a network namespace
        self.prefix = prefix or (lambda who: [])
        self.address = f"{host}:{port}"
        self.ca = None
        if secure:
            self.ca, pem, key = L.make_certificates(os.path.join(self.base, "certs"), [host])
            tls = (self.ca, pem, key)
        else:
            tls = None
        listen = "0.0.0.0" if host != "127.0.0.1" else host
        self.procs.start("superlink", [*self.prefix("server"), *L.superlink_cmd(port, listen, tls, auth=secure)],
                         L.flower_env(os.path.join(self.base, "superlink")), self.logs)
        L.wait_healthy(port, host=host, prefix=self.prefix("server"))
        self.home = os.path.join(self.base, "cli")
        self.connection = L.write_connection(self.home, self.address, self.ca)
        self.keys: dict[int, str] = {}
        self.state = os.path.join(self.run_dir, "clients")  # every site's state folder under it
        self.envs: dict[int, dict] = {}

    def add_client(self, client: int, *, register: bool = True, extra_node_config: str = "", env: dict | None = None):
        """Start client ``client``: its trainer (once it answers) and its SuperNode (its key
        registered first, unless ``register`` is False)."""
        key = None
        if self.secure:
            key = self.keys.get(client)
            if key is None:
                key, pub = L.make_client_key(os.path.join(self.base, "keys", f"client-{client}"))
                self.keys[client] = key
                if register:
                    L.register_client(pub, self.home, self.connection, prefix=self.prefix("server"))
        self.envs[client] = L.flower_env(os.path.join(self.base, f"client-{client}"), env)
        self.start_trainer(client)
        cmd = L.supernode_cmd(self.address, client, self.state, 19100 + client, root_certificates=self.ca,
                              private_key=key, extra_node_config=extra_node_config)
        return self.procs.start(f"client-{client}", [*self.prefix(f"client-{client}"), *cmd], self.envs[client],
                                self.logs)

    def start_trainer(self, client: int) -> None:
        """Start client ``client``'s trainer (from its saved state, if it has one) and wait
        until it answers."""
        trainer = self.procs.start(f"trainer-{client}", [*self.prefix(f"client-{client}"),
                                                         *L.trainer_cmd(client, self.state)], self.envs[client], self.logs)
        L.wait_trainer(self.state, client, alive=lambda: trainer.poll() is None)

    def kill_trainer(self, client: int) -> None:
        """The site's trainer crashes (SIGKILL); its SuperNode lives on."""
        self.procs.kill(f"trainer-{client}")

    def kill_client(self, client: int) -> None:
        """The site crashes: its SuperNode (with the relay it started) and its trainer."""
        self.procs.kill(f"client-{client}")
        self.kill_trainer(client)

    def start(self, cfg) -> int:
        return L.start_run(L.write_app(self.run_dir, cfg), self.home, self.connection, prefix=self.prefix("server"))

    def wait(self, timeout_s: float, on_row=None) -> dict:
        link = self.procs.procs["superlink"]
        return L.wait_summary(self.run_dir, timeout_s, on_row=on_row, alive=lambda: link.poll() is None)

    def stop(self) -> None:
        self.procs.stop()


def run_demo(cfg, *, clients: int, port: int = 18000, timeout_s: float = 3600.0, on_row=None) -> dict:
    """Certificates, a SuperLink, ``clients`` registered clients, one run; the summary."""
    name = cfg.train.name or f"federated-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(cfg.train.run_dir, name)
    fed = Federation(run_dir, port=port)
    try:
        for c in range(clients):
            fed.add_client(c)
        fed.start(cfg)
        return fed.wait(timeout_s, on_row)
    finally:
        fed.stop()
