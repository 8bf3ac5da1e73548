"""tandem's ServerApp: read the run config once, run the chosen method, log.

``flwr run .`` starts this on the SuperLink side. The run config is parsed and
validated before anything trains; an invalid key stops the run with a message
naming the key, the value and the rule.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from tandem.accounting import ByteLedger, MeteredGrid
from tandem.config import RunConfig, section_values
from tandem.preflight import run_checked
from tandem.registry import get_method
from tandem.server_context import ServerRun
from tandem.tracking import Tracker

__all__ = ["app"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, then hand the metered Grid to the method."""
    flat = dict(context.run_config)
    cfg = RunConfig.from_flat(flat)
    spec = get_method(cfg.method)
    options = cfg.method_options(flat)
    run_name = f"{cfg.method}-{context.run_id}"
    tracker = Tracker(
        cfg.tracking,
        run_name=run_name,
        group=str(context.run_id),
        config={**cfg.as_flat(), **section_values(options)},
        total_rounds=cfg.num_server_rounds,
    )
    ledger = ByteLedger()
    srv = ServerRun(
        grid=MeteredGrid(grid, ledger),
        ledger=ledger,
        cfg=cfg,
        options=options,
        tracker=tracker,
        context=context,
    )
    run_checked(srv, spec.run_server)  # data and node facts checked first
