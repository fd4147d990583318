"""Development and test tooling: realistic Stripe events and signed webhook posts."""
