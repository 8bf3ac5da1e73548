"""tandem: edge-cloud training on Flower over slow, changing networks."""
