"""Helpers of the launcher that need no Flower processes."""

from __future__ import annotations

import socket

from tandem.launch import PORT_FLOOR, _ephemeral_range, free_port


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    low, high = _ephemeral_range()
    assert PORT_FLOOR < low <= high
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(PORT_FLOOR <= p < low for p in ports)
    with socket.socket() as sock:  # free: a server can bind it
        sock.bind(("", ports[-1]))
