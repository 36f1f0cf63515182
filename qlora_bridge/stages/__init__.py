"""The stages of a release, one module each: train, merge, export, serve, smoke."""
