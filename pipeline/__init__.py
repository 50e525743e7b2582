"""premem.pipeline."""
