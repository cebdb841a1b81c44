"""fedrec data layer: schema, loaders, filters, splits, synthetic data."""
