"""Code shared by every service: configuration, storage, the bus, health and the CLI."""
