"""The inventory service: reserves and releases stock."""
