"""The services: each one a package of the same shape (see README, "Layout")."""
