"""Flower ServerApp and server-side aggregation and accounting."""
