"""SimulTrain's ServerApp entry: the cloud driven by the chosen transport.

:class:`~tandem.strategies.simultrain.SimulTrainCloud` holds the state and
does the maths; the transport (``simultrain-transport``) says how its
messages travel: :class:`~tandem.strategies.simultrain.FlowerLoop` (Flower
messages over the Grid, ``"message"``) or
:class:`~tandem.strategies.simultrain_stream.StreamLoop` (one gRPC stream per
edge, ``"stream"``). The stream module builds on the cloud module, so the
choice between them lives here, above both.
"""

from __future__ import annotations

from tandem.options import ConfigError
from tandem.protocol.simultrain import SimulTrainOptions
from tandem.server_context import ServerRun
from tandem.strategies.simultrain import FlowerLoop, SimulTrainCloud
from tandem.strategies.simultrain_stream import StreamLoop

__all__ = ["run"]


def run(srv: ServerRun) -> None:
    """Run SimulTrain until every edge has taken ``simultrain-steps`` steps."""
    opts = srv.options_as(SimulTrainOptions)
    if opts.realtime and opts.transport != "stream":
        raise ConfigError(
            "simultrain-realtime",
            True,
            'paces the stream: needs simultrain-transport="stream"',
        )
    cloud = SimulTrainCloud(srv, opts)
    cloud.resume()
    if opts.transport == "stream":  # binds its port now: a bad setting stops here
        loop: FlowerLoop | StreamLoop = StreamLoop(srv, cloud)
    else:
        loop = FlowerLoop(srv, cloud)
    cloud.start(srv.wait_for_nodes(timeout=120.0))
    loop.serve()
    cloud.finish()
