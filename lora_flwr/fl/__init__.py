"""The Flower layer: the only package that imports flwr."""
