"""Data in: manifests, images, the column names geo recognises."""
