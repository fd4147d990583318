"""Contracts that a service's writer and other services' readers share: read models
(domain/entitlements.py, domain/payments.py) and the usage domain (domain/usage/).
They import `shared` and nothing of any service."""
