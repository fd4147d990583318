DROP TABLE cache_refresh_pending;
