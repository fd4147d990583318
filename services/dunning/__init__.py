"""The dunning service. Not built yet: see issue 7."""
