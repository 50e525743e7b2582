"""premem.models."""
