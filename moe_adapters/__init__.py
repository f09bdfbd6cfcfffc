"""moea: moe_adapters."""
