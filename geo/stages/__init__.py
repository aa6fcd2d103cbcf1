"""The build's stages: embed, knn, cells, gallery, fusion; each a config, a fit, an artifact."""
