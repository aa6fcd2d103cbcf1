"""The query side: a loaded bundle answering photos or embeddings."""
