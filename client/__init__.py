"""Flower ClientApp and on-device training, state and privacy ledger."""
