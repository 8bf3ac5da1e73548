"""Edge side of each method: ClientApp message handlers, one module per method."""
