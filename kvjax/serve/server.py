"""uvicorn's server, with SIGTERM/SIGINT draining the engine first."""

from __future__ import annotations

import uvicorn


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM or SIGINT, new requests are refused (503) and the accepted ones
    get `grace` seconds to finish, then end with an error; uvicorn then closes and the
    process exits 0 (the signal is handled, not re-raised). A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, worker, grace: float):
        super().__init__(config)
        self.worker, self.grace = worker, grace

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:
            self.force_exit = True
            return
        self.worker.drain(self.grace)
        self.should_exit = True
