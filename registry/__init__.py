"""moea: registry."""
