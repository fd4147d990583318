-- Queries of shared/catalog.py (apply_catalog). Loaded by shared/sqlfile.py.
-- All run inside one transaction. Upserts only touch a row when a value
-- changed, so reloading an unchanged catalog leaves every row (and
-- plans.updated_at) as it was.

-- name: lock_catalog
-- Serialises concurrent loads; released at commit or rollback.
SELECT pg_advisory_xact_lock(hashtext('paymentsvc.catalog'));

-- name: referenced_plans
-- Which of the given plans projections still point at, and how often.
SELECT p.plan_id,
       (SELECT count(*) FROM subscriptions s WHERE s.plan_id = p.plan_id) AS subscriptions,
       (SELECT count(*) FROM entitlements e WHERE e.plan_id = p.plan_id) AS entitlements
FROM plans p
WHERE p.plan_id = ANY(%(plan_ids)s::text[])
  AND (EXISTS (SELECT 1 FROM subscriptions s WHERE s.plan_id = p.plan_id)
       OR EXISTS (SELECT 1 FROM entitlements e WHERE e.plan_id = p.plan_id))
ORDER BY p.plan_id;

-- name: plan_ids
SELECT plan_id FROM plans ORDER BY plan_id;

-- name: delete_plans
-- Cascades to plan_prices and plan_features.
DELETE FROM plans WHERE plan_id = ANY(%(plan_ids)s::text[]);

-- name: upsert_zone
INSERT INTO pricing_zones (zone_code, name, currency, countries)
VALUES (%(zone_code)s, %(name)s, %(currency)s, %(countries)s::text[])
ON CONFLICT (zone_code) DO UPDATE
SET name = EXCLUDED.name, currency = EXCLUDED.currency, countries = EXCLUDED.countries
WHERE (pricing_zones.name, pricing_zones.currency, pricing_zones.countries)
      IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.currency, EXCLUDED.countries);

-- name: delete_stale_zones
-- Run after delete_stale_prices, so no remaining price points at these.
DELETE FROM pricing_zones WHERE zone_code <> ALL(%(keep)s::text[]);

-- name: clear_other_default
-- plans_one_default is a unique index and cannot be deferred: when the default
-- moves to another plan, the old flag must go before the new one is set.
UPDATE plans SET is_default = false, updated_at = now()
WHERE is_default AND plan_id <> %(plan_id)s;

-- name: upsert_plan
INSERT INTO plans (plan_id, name, tier, is_default, family_pool, access_policy, dunning_policy)
VALUES (%(plan_id)s, %(name)s, %(tier)s, %(is_default)s, %(family_pool)s,
        %(access_policy)s, %(dunning_policy)s)
ON CONFLICT (plan_id) DO UPDATE
SET name = EXCLUDED.name,
    tier = EXCLUDED.tier,
    is_default = EXCLUDED.is_default,
    family_pool = EXCLUDED.family_pool,
    access_policy = EXCLUDED.access_policy,
    dunning_policy = EXCLUDED.dunning_policy,
    updated_at = now()
WHERE (plans.name, plans.tier, plans.is_default, plans.family_pool,
       plans.access_policy, plans.dunning_policy)
      IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.tier, EXCLUDED.is_default,
                        EXCLUDED.family_pool, EXCLUDED.access_policy, EXCLUDED.dunning_policy);

-- name: upsert_price
-- A price may move to another plan: plan_id is updated like the rest.
INSERT INTO plan_prices (price_id, plan_id, zone_code, amount, currency, billing_interval)
VALUES (%(price_id)s, %(plan_id)s, %(zone_code)s, %(amount)s, %(currency)s,
        %(billing_interval)s)
ON CONFLICT (price_id) DO UPDATE
SET plan_id = EXCLUDED.plan_id,
    zone_code = EXCLUDED.zone_code,
    amount = EXCLUDED.amount,
    currency = EXCLUDED.currency,
    billing_interval = EXCLUDED.billing_interval
WHERE (plan_prices.plan_id, plan_prices.zone_code, plan_prices.amount,
       plan_prices.currency, plan_prices.billing_interval)
      IS DISTINCT FROM (EXCLUDED.plan_id, EXCLUDED.zone_code, EXCLUDED.amount,
                        EXCLUDED.currency, EXCLUDED.billing_interval);

-- name: delete_stale_prices
DELETE FROM plan_prices WHERE price_id <> ALL(%(keep)s::text[]);

-- name: upsert_feature
INSERT INTO plan_features (plan_id, feature_code, usage_limit, limit_period, enforcement,
                           allow_release, member_cap, min_access)
VALUES (%(plan_id)s, %(feature_code)s, %(usage_limit)s, %(limit_period)s, %(enforcement)s,
        %(allow_release)s, %(member_cap)s, %(min_access)s)
ON CONFLICT (plan_id, feature_code) DO UPDATE
SET usage_limit = EXCLUDED.usage_limit,
    limit_period = EXCLUDED.limit_period,
    enforcement = EXCLUDED.enforcement,
    allow_release = EXCLUDED.allow_release,
    member_cap = EXCLUDED.member_cap,
    min_access = EXCLUDED.min_access
WHERE (plan_features.usage_limit, plan_features.limit_period, plan_features.enforcement,
       plan_features.allow_release, plan_features.member_cap, plan_features.min_access)
      IS DISTINCT FROM (EXCLUDED.usage_limit, EXCLUDED.limit_period, EXCLUDED.enforcement,
                        EXCLUDED.allow_release, EXCLUDED.member_cap, EXCLUDED.min_access);

-- name: delete_stale_features
DELETE FROM plan_features
WHERE plan_id = %(plan_id)s AND feature_code <> ALL(%(keep)s::text[]);
