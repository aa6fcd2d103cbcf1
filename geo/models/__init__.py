"""Models: the backbone registry and backbones, weights, the location encoder, the cell heads."""
