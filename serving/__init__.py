"""moea: serving."""
