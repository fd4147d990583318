"""The usage domain, shared by the API (IncrementUsage, CheckQuota, ListUsage) and the
usage worker: limits and periods (model), the Redis counters and their Lua scripts
(counters), and the Postgres reads and writes of usage records and aggregates
(repository, sql/usage.sql). The worker package keeps its projection and the cache rebuild."""
