"""Storage: the bundle, atomic writes, embedding shards, predictions files."""
