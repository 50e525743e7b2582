"""premem.jobs."""
