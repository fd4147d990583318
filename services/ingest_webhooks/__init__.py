"""Stripe webhook ingester: verifies, normalizes and publishes Stripe events."""
