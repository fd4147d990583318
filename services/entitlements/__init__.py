"""The entitlements service: payment-events -> customers, subscriptions, entitlements, payments; Redis."""
