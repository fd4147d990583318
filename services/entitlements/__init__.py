"""The entitlements service. Not built yet: see issue 4."""
