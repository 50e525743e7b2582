"""premem.storage."""
