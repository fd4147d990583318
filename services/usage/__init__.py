"""The usage service: usage-events -> usage_records and per-period aggregates; Redis counters."""
