"""Small shared builders for tests (importable, unlike conftest)."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common.identity import Identity
from node.model.config import ModelConfig

KEYS: dict[str, Identity] = {}


def key(name: str) -> Identity:
    """One keypair per test name, so a named node that comes back is the same node."""
    return KEYS.setdefault(name, Identity.generate())


def nid(name: str) -> str:
    """The node id of `name`'s key."""
    return key(name).node_id


def tiny_model(**overrides) -> ModelConfig:
    """Smallest config that still has a 128x bottleneck (d=128 -> b=1)."""
    base = dict(d_model=128, n_heads=2, n_layers=3, n_stages=3, seq_len=16, compression=128)
    return ModelConfig(**{**base, **overrides})


def in_spawned_process(target, timeout_s: float):
    """What `target(conn)` sends back, run in a fresh spawned process (hivemind's averagers and
    DHT peers fork: a test process that has gRPC and torch threads must not). The process is
    reaped, killed if it hangs."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(send,))
    proc.start()
    send.close()
    try:
        assert recv.poll(timeout_s), "the spawned process did not answer"
        return recv.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()


def once_per_run(request, name: str, compute):
    """`compute()`, run once per test run however many pytest-xdist workers share a module:
    the first worker computes it, the others read its pickled result (a module fixture runs
    once per worker that takes one of the module's tests: a spawned swarm of averagers twice).
    Without xdist, it just computes."""
    import pickle

    from filelock import FileLock

    worker = getattr(request.config, "workerinput", None)
    if worker is None:
        return compute()
    factory = request.getfixturevalue("tmp_path_factory")
    path = factory.getbasetemp().parent / f"{name}.pickle"  # this run's, shared by its workers
    with FileLock(f"{path}.lock"):
        if path.exists():
            return pickle.loads(path.read_bytes())
        value = compute()
        path.write_bytes(pickle.dumps(value))
        return value


def wait_for(pred, timeout: float = 120.0):
    """Poll `pred` until it returns something truthy (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """A plain static file server on 127.0.0.1 over `directory` (as a dataset's data_source
    would be served): yields its URL and the list of paths it was asked for."""
    got: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            got.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=directory))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", got
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def endless_swarm(workdir):
    """A 2-stage `resbm simulate` swarm of tiny nodes (one per stage, joined through a real
    coordinator) that trains until it is stopped: for tests that kill parts of it."""
    from resbm.simulate import SimulateConfig, Swarm

    cfg = SimulateConfig(
        model={"d_model": 64, "n_heads": 2, "seq_len": 32, "compression": 16},
        steps=100_000,
        batch_size=2,
        threads=1,
        workdir=workdir,
    )
    return Swarm(cfg, cfg.workdir)
