"""`absorber serve`: the engine behind uvicorn; and BackgroundServer, the same server on a thread of
the calling process (tests, benchmarks)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from ..errors import InputError
from .app import ServeConfig, create_app
from .state import StateDir


def served_name(model) -> str:
    return os.path.basename(os.path.normpath(str(model)))


def serve(args, config, load_engine) -> int:
    """Runs the server until interrupted; `config` and `load_engine` are the CLI's."""
    import uvicorn

    from ..config import AbsorberConfig

    updates = {k: v for k, v in (("max_resident", args.max_resident), ("max_batch", args.max_batch)) if v is not None}
    if updates:
        config = AbsorberConfig.from_dict({**config.to_dict(), **updates})
    state = StateDir(args.state_dir) if args.state_dir else None       # in use by another server: refused now
    engine = load_engine(args, config=config)
    cfg = ServeConfig(model_id=args.served_model_name or served_name(args.model), state_dir=args.state_dir,
                      max_queue=args.max_queue, max_batch=config.max_batch, timeout_s=args.timeout,
                      max_body_bytes=args.max_body_bytes, idle_save_s=args.idle_save)
    app = create_app(engine, cfg, state)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # Told at the signal, not after uvicorn's graceful wait: a long /absorb ends after its
            # round in flight (saved) with a 503, instead of holding the shutdown to the end of its document
            app.state.worker.stopping()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                                   timeout_graceful_shutdown=5))
    try:
        server.run()
    except SystemExit:      # uvicorn's own exit when it cannot listen: its code 3 would read as "no model"
        if server.started:
            raise
        raise InputError(f"the server could not listen on {args.host}:{args.port} (the error above says why)") from None
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """A server on a thread of this process: `with BackgroundServer(engine, cfg) as url: ...`."""

    def __init__(self, engine, cfg: ServeConfig, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.app = create_app(engine, cfg)
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.app.state.worker.stopping()
        self.server.should_exit = True
        self.thread.join(timeout=60)
