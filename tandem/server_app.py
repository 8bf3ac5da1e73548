"""tandem's ServerApp: read the run config once, run the chosen method, log.

``flwr run .`` starts this on the SuperLink side. The run config is parsed and
validated (every key, whatever the method) and the data is loaded before any
node is asked to train; an invalid key stops the run with one line naming the
key, the value and the rule. Flower logs it at the end of the ServerApp's
traceback and keeps it as the run's status detail (``flwr list``: ``Simulation
failed with exception: run config 'lr' = -1.0: must be > 0``; ``ServerApp
failed with ...`` on the deployment engine).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from tandem.config import RunConfig
from tandem.preflight import run_checked
from tandem.registry import get_method
from tandem.server_context import ServerRun

__all__ = ["app"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, then hand the metered Grid to the method."""
    cfg = RunConfig.from_flat(context.run_config)
    srv = ServerRun.open(cfg, grid, context.run_id)
    run_checked(srv, get_method(cfg.method).run_server)  # data and nodes first
