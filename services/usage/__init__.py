"""The usage service. Not built yet: see issue 6."""
