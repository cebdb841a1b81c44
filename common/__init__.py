"""Shared foundation of fedrec: data, model, evaluation, centralized reference training."""
