"""`farsync federate ...`: federated pre-training (Photon) on Flower's deployment runtime.

    farsync federate certs DIR --host ADDR        server site: a CA and the SuperLink's certificate
    farsync federate server --certs DIR [--auth]  server site: the SuperLink
    farsync federate keygen PATH                  client site: its key pair (PATH, PATH.pub)
    farsync federate register PATH.pub --superlink ADDR --ca DIR/ca.crt
                                                  operator: allow that client to join
    farsync federate client --client K --superlink ADDR --ca ca.crt --key PATH
                                                  client site: its trainer and a SuperNode (shard K)
    farsync federate trainer --client K --state-dir DIR
                                                  client site: the trainer alone (`client` starts it)
    farsync federate run [RECIPE] [--k=v ...] --superlink ADDR --ca ca.crt
                                                  anyone with the CA: start a run, follow it
    farsync federate demo [RECIPE] [--k=v ...] --clients 3
                                                  all of it on this machine (TLS and keys included)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import typer

from farsync.cli.common import fail, user_errors
from farsync.overrides import split_args

app = typer.Typer(help="Federated pre-training across organizations (Photon) on Flower: server, clients, runs.",
                  no_args_is_help=True)
CTX = {"allow_extra_args": True, "ignore_unknown_options": True}


def _config(ctx: typer.Context, extra: list[str] | None = None):
    from farsync.federated.core import federated_config
    from farsync.train.config import load_recipe

    positional, overrides = split_args(list(ctx.args))
    if len(positional) > 1:
        raise fail(f"at most one recipe file (got {positional}); overrides look like --section.key=value")
    return user_errors(lambda: federated_config(load_recipe(positional[0]) if positional else None,
                                                [*overrides, *(extra or [])]))


def _home(name: str) -> str:
    return os.path.join(os.path.expanduser(os.environ.get("FARSYNC_HOME", "~/.farsync")), "flower", name)


@app.command("certs")
def certs(out_dir: str = typer.Argument(..., help="Folder for ca.crt, server.pem, server.key."),
          host: list[str] = typer.Option(..., "--host", help="Name or address clients reach the SuperLink at (repeat).")):
    """A certificate authority and the SuperLink's certificate (server site)."""
    from farsync.federated.launch import make_certificates

    ca, pem, key = user_errors(lambda: make_certificates(out_dir, host))
    typer.echo(f"{ca}: give it to every client site and to whoever starts runs\n{pem}, {key}: keep on the server site")


@app.command("keygen")
def keygen(path: str = typer.Argument(..., help="Private key file to write (the public key goes to PATH.pub).")):
    """A client site's key pair (ECDSA P-384, OpenSSH format)."""
    from farsync.federated.launch import make_client_key

    key, pub = make_client_key(path)
    typer.echo(f"{key}: keep on this client site\n{pub}: send to the federation's operator to register")


@app.command("server")
def server(certs_dir: str = typer.Option(None, "--certs", help="Folder made by `farsync federate certs` (TLS)."),
           insecure: bool = typer.Option(False, "--insecure", help="No TLS (one machine or a trusted network only)."),
           auth: bool = typer.Option(True, "--auth/--no-auth", help="Only registered client keys may join (needs TLS)."),
           host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on."),
           port: int = typer.Option(8000, "--port", help="The SuperLink's port (clients, runs and the CLI all use it).")):
    """The SuperLink (server site); runs until stopped."""
    from farsync.federated.launch import flower_env, superlink_cmd

    if not insecure and not certs_dir:
        raise fail("give --certs DIR (from `farsync federate certs`), or --insecure for a run without TLS")
    if insecure and auth:
        raise fail("client authentication needs TLS: give --certs DIR, or --no-auth with --insecure")
    tls = None if insecure else tuple(os.path.join(certs_dir, n) for n in ("ca.crt", "server.pem", "server.key"))
    for p in tls or ():
        if not os.path.isfile(p):
            raise fail(f"--certs {certs_dir}: no {os.path.basename(p)} there (make them with `farsync federate certs`)")
    cmd = superlink_cmd(port, host, tls, auth)
    raise typer.Exit(subprocess.call(cmd, env=flower_env(_home("superlink"))))


@app.command("register")
def register(public_key: str = typer.Argument(..., help="A client's PATH.pub."),
             superlink: str = typer.Option(..., "--superlink", help="HOST:PORT of the SuperLink."),
             ca: str = typer.Option(..., "--ca", help="The federation's ca.crt.")):
    """Allow the client with this public key to join (operator)."""
    from farsync.federated.launch import register_client, write_connection

    if not os.path.isfile(public_key):
        raise fail(f"{public_key}: no such file (a client makes it with `farsync federate keygen`)")
    home = _home("cli")
    conn = write_connection(home, superlink, ca)
    try:
        node = register_client(public_key, home, conn)
    except RuntimeError as e:
        raise fail(str(e)) from None
    typer.echo(f"registered {public_key}: node {node}")


@app.command("client")
def client(client_index: int = typer.Option(..., "--client", help="This site's data shard K (0 ... algo.workers-1)."),
           superlink: str = typer.Option(..., "--superlink", help="HOST:PORT of the SuperLink."),
           ca: str = typer.Option(None, "--ca", help="The federation's ca.crt (TLS)."),
           key: str = typer.Option(None, "--key", help="This site's private key (from `farsync federate keygen`)."),
           state_dir: str = typer.Option(None, "--state-dir", help="Where this client keeps its state between rounds."),
           port: int = typer.Option(9094, "--port", help="Local port of the SuperNode's own API."),
           retry_s: float = typer.Option(
               90.0, "--retry-s",
               help="Keep asking this long when refused: a restarted client is admitted once the SuperLink has "
                    "counted its previous SuperNode out (~60 s after it stopped)."),
           insecure: bool = typer.Option(False, "--insecure", help="No TLS.")):
    """This site's trainer (the model, kept in memory between rounds) and a SuperNode that
    relays it every message of every run for shard K (client site); runs until stopped."""
    from farsync.federated.launch import flower_env, supernode_cmd

    if not insecure and not ca:
        raise fail("give --ca ca.crt (the federation's certificate authority), or --insecure")
    state_dir = state_dir or os.path.join(os.path.expanduser("~/.farsync"), "clients")
    cmd = supernode_cmd(superlink, client_index, state_dir, port, root_certificates=None if insecure else ca,
                        private_key=key)
    trainer = _Trainer(client_index, state_dir)
    try:
        trainer.start()
        end = time.time() + retry_s
        while True:
            code, tail = _supernode(cmd, flower_env(_home(f"client-{client_index}")))
            why = refusal(tail, key) if code else None
            if not code or not why or not why.startswith("the SuperLink refused") or time.time() >= end:
                break
            typer.echo(f"farsync federate client: refused; asking again (until {retry_s:g} s have passed)", err=True)
            time.sleep(5)
    except RuntimeError as e:
        raise fail(str(e)) from None
    finally:
        trainer.stop()
    if code:
        raise fail(why or f"the SuperNode exited with code {code}")


#: the environment variable that names the process a trainer started by `client` lives for
PARENT_ENV = "FARSYNC_TRAINER_PARENT"


class _Trainer:
    """The site's trainer process, started again (it loads its last saved state) when it
    dies while the SuperNode runs. It ends with this process: :meth:`stop`, or, if this one
    is killed, by itself (:func:`exit_with_parent`)."""

    def __init__(self, client: int, state_dir: str):
        self.client, self.state_dir = client, state_dir
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.lock = threading.Lock()  # a spawn and stop() take turns: no trainer started after stop()
        self.watch: threading.Thread | None = None

    def _spawn(self) -> None:
        from farsync.federated.launch import trainer_cmd, wait_trainer

        with self.lock:
            if self.stopping:
                return
            p = self.proc = subprocess.Popen(trainer_cmd(self.client, self.state_dir), start_new_session=True,
                                             env={**os.environ, PARENT_ENV: str(os.getpid())})
        wait_trainer(self.state_dir, self.client, alive=lambda: p.poll() is None)

    def start(self) -> None:
        self._spawn()
        self.watch = threading.Thread(target=self._supervise, daemon=True)
        self.watch.start()

    def _supervise(self) -> None:
        while not self.stopping:
            code = self.proc.wait()
            if self.stopping:
                return
            typer.echo(f"farsync federate client: the trainer exited with code {code}; starting it again "
                       "(it loads its last saved state)", err=True)
            try:
                self._spawn()
            except RuntimeError as e:
                if self.stopping:  # stop() ended the one being started
                    return
                typer.echo(f"farsync federate client: {e}; messages fail until it is back", err=True)
                time.sleep(5)
            except Exception as e:  # e.g. OSError from Popen: said, and tried again
                typer.echo(f"farsync federate client: could not start the trainer ({type(e).__name__}: {e}); "
                           "trying again in 5 s, messages fail until it is back", err=True)
                time.sleep(5)

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            p = self.proc
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()


def exit_with_parent(parent: int, interval_s: float = 1.0) -> threading.Thread:
    """A thread that sends this process SIGTERM once ``parent`` is no longer its parent
    (it died, even by SIGKILL, and this one was handed to init): a trainer `client` started
    does not outlive it, holding the socket."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=watch, daemon=True, name="exit-with-parent")
    t.start()
    return t


@app.command("trainer")
def trainer(client_index: int = typer.Option(..., "--client", help="This site's data shard K (0 ... algo.workers-1)."),
            state_dir: str = typer.Option(None, "--state-dir", help="The state folder its SuperNode names "
                                                                       "(--node-config state-dir).")):
    """The site's trainer alone (`farsync federate client` starts it): answers the relays
    its SuperNode starts, over a socket in the state folder; runs until stopped."""
    from farsync.federated.trainer import SiteTrainer

    state_dir = state_dir or os.path.join(os.path.expanduser("~/.farsync"), "clients")
    try:
        t = SiteTrainer(state_dir, client_index)
    except (ValueError, RuntimeError) as e:
        raise fail(str(e)) from None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if os.environ.get(PARENT_ENV, "").isdigit():  # started by `farsync federate client`: ends with it
        exit_with_parent(int(os.environ.pop(PARENT_ENV)))
    try:
        t.serve()
    except KeyboardInterrupt:
        pass


def _supernode(cmd: list[str], env: dict) -> tuple[int, list[str]]:
    """Run a SuperNode to its end, its output shown live; (exit code, its last lines)."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    tail: list[str] = []

    def pump() -> None:
        for line in p.stdout:
            sys.stderr.write(line)
            tail.append(line)
            del tail[:-40]

    threading.Thread(target=pump, daemon=True).start()
    try:
        code = p.wait()
    except KeyboardInterrupt:
        os.killpg(p.pid, signal.SIGTERM)
        code = p.wait()
    time.sleep(0.5)  # the last lines
    try:  # its helper process (Flower's SuperExec) goes with it
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    return code, list(tail)


def refusal(lines: list[str], key: str | None) -> str | None:
    """One line for the ways a SuperLink refuses a client."""
    text = "".join(lines)
    if "2004" in text or "Failed to activate SuperNode" in text:
        return (f"the SuperLink refused this client: its key {key + '.pub' if key else ''} is not registered "
                "(the operator runs `farsync federate register KEY.pub ...`), or its previous SuperNode is "
                "still counted online")
    if "2001" in text:
        return "the SuperLink only admits registered clients: give --key (from `farsync federate keygen`)"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS: the SuperLink's certificate is not signed by --ca (or the address is not in it)"
    return None


@app.command("run", context_settings=CTX)
def run(ctx: typer.Context,
        superlink: str = typer.Option(..., "--superlink", help="HOST:PORT of the SuperLink."),
        ca: str = typer.Option(None, "--ca", help="The federation's ca.crt (TLS); omit with --insecure."),
        insecure: bool = typer.Option(False, "--insecure", help="No TLS."),
        follow: bool = typer.Option(True, "--follow/--no-follow", help="Print each round as it ends (needs the run directory here).")):
    """Start a federated run (training options as for `farsync train`) and follow it."""
    from farsync.federated.launch import start_run, wait_summary, write_app, write_connection

    if not insecure and not ca:
        raise fail("give --ca ca.crt, or --insecure")
    cfg = _config(ctx)
    run_dir = os.path.join(cfg.train.run_dir, cfg.train.name or f"federated-{time.strftime('%Y%m%d-%H%M%S')}")
    app_dir = write_app(run_dir, cfg)
    home = _home("cli")
    conn = write_connection(home, superlink, None if insecure else ca)
    try:
        run_id = start_run(app_dir, home, conn)
    except RuntimeError as e:
        raise fail(str(e)) from None
    typer.echo(f"run {run_id} started; its directory on the server site: {os.path.abspath(run_dir)}")
    if follow:
        try:
            s = wait_summary(run_dir, 7 * 86400, on_row=_print_row)
        except RuntimeError as e:
            raise fail(str(e)) from None
        typer.echo(json.dumps(s, indent=2))


def _print_row(r: dict) -> None:
    typer.echo(f"round {r['round'] + 1}: kept {r['kept']}" + (f", excluded {r['excluded']}" if r["excluded"] else "")
               + (f", no reply from {sorted(r['failed'])}" if r.get("failed") else "")
               + f", {r['round_seconds']:.1f} s" + (f", eval loss {r['eval_loss']:.4f}" if "eval_loss" in r else ""))


@app.command("demo", context_settings=CTX)
def demo(ctx: typer.Context,
         clients: int = typer.Option(3, "--clients", help="Client sites to start on this machine."),
         port: int = typer.Option(18000, "--port", help="The SuperLink's port."),
         timeout: float = typer.Option(3600.0, "--timeout", help="Give up after this many seconds.")):
    """A federation on this machine: a SuperLink with TLS and client keys, N clients (each
    registered), one run of the recipe; everything is stopped at the end."""
    from farsync.federated.demo import run_demo

    cfg = _config(ctx, [f"--algo.workers={clients}", f"--federated.min_clients={clients}"])
    try:
        s = run_demo(cfg, clients=clients, port=port, timeout_s=timeout, on_row=_print_row)
    except RuntimeError as e:
        raise fail(str(e)) from None
    typer.echo(json.dumps({k: s[k] for k in ("run_dir", "rounds", "final_eval_loss", "clients")}, indent=2))


def register_cli(root: typer.Typer) -> None:
    root.add_typer(app, name="federate")
