"""Cloud side of each method: what runs in the ServerApp, one module per method."""
