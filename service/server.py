"""Running the app under uvicorn: in the foreground (`xmr serve`) or in a background thread on
an already bound socket (the demo and end-to-end tests)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from service.app import create_app
from service.settings import Settings


def serve(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; SIGHUP reloads checkpoints and indexes."""
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_config=None, access_log=False)
    uvicorn.Server(config).run()


@contextmanager
def background_server(settings: Settings, timeout_s: float = 60.0) -> Iterator[str]:
    """Start the app on a free local port in a thread; yields its base URL, stops it after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(settings), log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server stopped during start-up (see the log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start within {timeout_s:.0f}s")
            time.sleep(0.05)
        yield f"http://{settings.host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)
        sock.close()
