"""Privacy accounting: pure functions over recorded mechanisms (no Flower, no training)."""
