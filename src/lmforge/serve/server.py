"""Running the app under uvicorn with a graceful shutdown.

On SIGTERM (or Ctrl-C) the server first drains: new requests get 503 while the ones in flight, streams
included, run to their end (at most `grace_s`); then uvicorn closes. A second signal closes it at once.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from lmforge.serve.app import begin_draining, in_flight


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signal drains the app before stopping it."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float = 300.0) -> None:
        super().__init__(config)
        self.lmforge_app, self.grace_s = app, grace_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.lmforge_app.state.draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        begin_draining(self.lmforge_app)
        threading.Thread(target=self._exit_when_idle, name="lmforge-drain", daemon=True).start()

    def _exit_when_idle(self) -> None:
        deadline = time.monotonic() + self.grace_s
        while in_flight(self.lmforge_app) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.should_exit = True


def serve_forever(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, grace_s: float = 300.0) -> None:
    """Serve until SIGTERM/SIGINT, drain, stop the engine, return (the process then exits with status 0)."""
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning",
                            timeout_graceful_shutdown=grace_s)
    server = DrainingServer(config, app, grace_s)
    # uvicorn re-raises the signal it caught once it has stopped; a handler of ours absorbs it so that a
    # drained shutdown ends the command normally instead of killing the process.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        app.state.served.stop()
