"""The dunning service: dunning cases from payment-events, and the retry scheduler."""
