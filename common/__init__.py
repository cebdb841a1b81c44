"""Shared foundation of fedrec: data, model, evaluation, privacy, the run configuration, the
reply a device sends, Flower launch helpers, the audit of run folders, centralized reference
training. Imports nothing of fedrec outside itself."""
