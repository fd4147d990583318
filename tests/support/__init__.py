"""Test support: private dependencies that a test may stop, and small test projections."""
