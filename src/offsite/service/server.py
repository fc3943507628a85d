"""Running the service: uvicorn on a socket this module binds, so port 0 (any free port) works
and the real address is known before the first request."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading

import uvicorn

from ..errors import ConfigError

from .app import Service, create_app
from .config import ServeConfig


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn(service: Service, log_level: str) -> uvicorn.Server:
    # Our own handler config: uvicorn's default one would replace the root logger's handlers.
    config = uvicorn.Config(create_app(service), log_level=log_level, log_config=None, access_log=log_level == "debug",
                            timeout_graceful_shutdown=5, limit_concurrency=service.config.max_connections, timeout_keep_alive=5)
    return uvicorn.Server(config)


def serve(config: ServeConfig) -> None:
    """`offsite serve`: start the service and block until Ctrl-C / SIGTERM."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = Service(config)
    service.start()
    # uvicorn stops gracefully on SIGTERM, then raises the signal again for its previous
    # handler: a no-op here, so the service is closed below and the exit status is 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        sock = bind(config.host, config.port)
        print(f"offsite serve: listening on {url_of(sock)} (bundles {config.bundles}, state {config.state})", flush=True)
        _uvicorn(service, config.log_level).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        service.stop()
        print("offsite serve: stopped", file=sys.stderr, flush=True)


class ServerThread:
    """The real server in a background thread of this process (tests, benchmarks):
    `with ServerThread(config) as server: Client(server.url, token)`."""

    def __init__(self, config: ServeConfig, log_level: str = "warning"):
        self.service = Service(config)
        self.service.start()
        try:
            self.sock = bind(config.host, config.port)
        except BaseException:
            self.service.stop()
            raise
        self.url = url_of(self.sock)
        self.server = _uvicorn(self.service, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            self.thread.join(0.01)
        if not self.server.started:
            self.stop()
            raise RuntimeError("offsite server thread failed to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        self.service.stop()

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
