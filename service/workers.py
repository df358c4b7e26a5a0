"""`xmr serve --workers N`: N server processes on one port, and the supervisor that runs them.

Each worker is a whole app (models, indexes, encoder, one event loop) in its own process,
listening on the port with SO_REUSEPORT, so the kernel spreads new connections evenly over
the workers. They share sessions through Redis (required). The supervisor:
- forwards SIGHUP to every worker (each reloads, and keeps its models if the reload fails);
- after an admin reload in one worker (`POST /admin/reload`), sends SIGHUP to the others;
- gives Prometheus a per-run directory (PROMETHEUS_MULTIPROC_DIR) so `/metrics` adds up the
  workers (`service.metrics`), and removes it at the end;
- replaces a worker that exits after it was ready; one that exits before (bad artifacts, say)
  stops the server with an error;
- on SIGTERM or SIGINT stops the workers (uvicorn finishes the requests in flight) and exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from service.metrics import MULTIPROCESS_DIR
from service.settings import Settings

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0


class WorkersError(RuntimeError):
    """Settings that cannot run several workers, or a worker that failed to start."""


def check_workers(settings: Settings) -> None:
    if settings.workers > 1 and not settings.redis_url:
        raise WorkersError(
            f"--workers {settings.workers} needs Redis for sessions (XMR_REDIS_URL or "
            "--redis-url): the in-process store would give each worker sessions of its own")


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT, not yet listening."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def run_worker(settings: Settings, port: int, conn: Connection, number: int) -> None:
    """A worker process: the app on its own SO_REUSEPORT socket until SIGTERM/SIGINT."""
    # SIGHUP would end the process until the app handles it (after loading): ignore till then
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    threading.Thread(target=_stop_with, args=(os.getppid(),), daemon=True).start()
    import uvicorn  # here, after PROMETHEUS_MULTIPROC_DIR is in the environment

    from service.app import create_app

    app = create_app(settings, on_ready=partial(conn.send, ("ready", number)),
                     reload_peers=partial(conn.send, ("reload", number)))
    config = uvicorn.Config(app, log_config=None, access_log=False)
    uvicorn.Server(config).run(sockets=[listening_socket(settings.host, port)])


def _stop_with(supervisor: int) -> None:
    """SIGTERM to this worker once its supervisor is gone, even killed with SIGKILL: an orphan
    would go on serving on the port (SO_REUSEPORT) beside the next `xmr serve`."""
    while os.getppid() == supervisor:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Worker:
    number: int
    process: BaseProcess
    conn: Connection  # messages from the worker: ("ready" | "reload", number)
    ready: bool = False


class Supervisor:
    """Starts, watches, signals and stops the workers (see the module docstring)."""

    def __init__(self, settings: Settings, port: int, metrics_dir: str) -> None:
        self.settings = settings
        self.port = port
        self.metrics_dir = metrics_dir
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, _Worker] = {}
        self.stopping = False

    def start(self, number: int) -> None:
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(target=run_worker, name=f"xmr-worker-{number}",
                                       args=(self.settings, self.port, send, number))
        process.start()
        send.close()  # the worker holds the sending end; EOF here once it is gone
        self.workers[number] = _Worker(number, process, receive)
        logger.info("worker started number=%d pid=%s", number, process.pid)

    def signal_workers(self, signum: int, skip: int | None = None) -> None:
        for worker in self.workers.values():
            if worker.ready and worker.number != skip and worker.process.pid is not None:
                os.kill(worker.process.pid, signum)

    def run(self) -> int:
        """Supervise until stopped; the exit status."""
        for number in range(self.settings.workers):
            self.start(number)
        while not self.stopping:
            workers = list(self.workers.values())
            ready = wait([w.conn for w in workers] + [w.process.sentinel for w in workers],
                         timeout=0.5)
            for worker in workers:
                if worker.conn in ready:
                    self._receive(worker)
                if worker.process.sentinel in ready and not self.stopping:
                    status = self._replace(worker)
                    if status is not None:
                        return status
        return 0

    def _receive(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                message, number = worker.conn.recv()
                if message == "ready":
                    worker.ready = True
                    logger.info("worker ready number=%d pid=%s", number, worker.process.pid)
                elif message == "reload":
                    logger.info("admin reload in worker %d: reloading the others", number)
                    self.signal_workers(signal.SIGHUP, skip=number)
        except (EOFError, OSError):  # the worker is gone; its sentinel says so
            pass

    def _replace(self, worker: _Worker) -> int | None:
        """A worker exited: start another, or return an exit status if it never got ready."""
        worker.process.join()
        self._forget(worker)
        if not worker.ready:
            logger.error("worker %d exited with %s before it was ready (see its log); stopping",
                         worker.number, worker.process.exitcode)
            return 1
        logger.warning("worker %d (pid %s) exited with %s; starting another", worker.number,
                       worker.process.pid, worker.process.exitcode)
        self.start(worker.number)
        return None

    def _forget(self, worker: _Worker) -> None:
        from prometheus_client import multiprocess

        worker.conn.close()
        if worker.process.pid is not None:  # its live gauges (xmr_model_info) go with it
            multiprocess.mark_process_dead(worker.process.pid, self.metrics_dir)

    def stop(self) -> None:
        """SIGTERM to every worker, then wait (uvicorn drains), then SIGKILL what is left."""
        self.stopping = True
        for worker in self.workers.values():
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for worker in self.workers.values():
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                logger.warning("worker %d did not stop in %.0f s; killing it", worker.number,
                               STOP_TIMEOUT_S)
                worker.process.kill()
                worker.process.join()


def serve_workers(settings: Settings) -> int:
    """Serve with `settings.workers` processes until SIGTERM/SIGINT; the exit status."""
    check_workers(settings)
    reserved = listening_socket(settings.host, settings.port)  # holds the port (and picks 0)
    port = reserved.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="xmr-metrics-")
    os.environ[MULTIPROCESS_DIR] = metrics_dir
    supervisor = Supervisor(settings, port, metrics_dir)

    def on_stop(signum: int, frame: FrameType | None) -> None:
        supervisor.stopping = True

    def on_hup(signum: int, frame: FrameType | None) -> None:
        logger.info("SIGHUP: reloading every worker")
        supervisor.signal_workers(signal.SIGHUP)

    previous = {signum: signal.signal(signum, handler) for signum, handler in
                ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup))}
    logger.info("serving with workers=%d host=%s port=%d metrics_dir=%s", settings.workers,
                settings.host, port, metrics_dir)
    try:
        return supervisor.run()
    finally:
        supervisor.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        reserved.close()
        os.environ.pop(MULTIPROCESS_DIR, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
