"""The GPS gallery stage: a GeoCLIP-style location encoder trained on stored embeddings."""
