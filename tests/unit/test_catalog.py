"""The plan catalog: the shipped file, validation messages with lines, policies, SQL files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from shared.catalog import (
    SQL_PATH,
    Catalog,
    CatalogError,
    load_catalog,
    parse_catalog,
)
from shared.config import DEFAULT_CATALOG_PATH
from shared.sqlfile import load_queries

DAY = 86_400.0

# A small valid catalog; the tests below break it one line at a time. Line numbers:
#  1 version        6 zones          11 tier          16 prices
#  2 defaults       7 us             12 default       17 price_basic
#  3 access_policy  8 plans          13 basic         18 features
#  4 active         9 free           14 name          19 api_calls
#  5 past_due      10 name           15 tier          20 export_pdf
BASE = """\
version: 1
defaults:
  access_policy:
    active: full
    past_due: {level: full, grace_days: 7, then: reduced}
zones:
  us: {name: United States, currency: usd}
plans:
  free:
    name: Free
    tier: 0
    default: true
  basic:
    name: Basic
    tier: 1
    prices:
      price_basic: {zone: us, currency: usd, amount: 900, interval: month}
    features:
      api_calls: {limit: 100, period: month}
      export_pdf: {min_access: reduced}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plans.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def replace_line(number: int, new: str, text: str = BASE) -> str:
    lines = text.splitlines()
    lines[number - 1] = new
    return "\n".join(lines) + "\n"


def insert_after(number: int, new: str, text: str = BASE) -> str:
    lines = text.splitlines()
    lines[number:number] = new.splitlines()
    return "\n".join(lines) + "\n"


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    return str(info.value)


# ---------------------------------------------------------------- loading


def test_the_shipped_catalog_loads_with_free_as_default_and_every_price_mapped() -> None:
    catalog = load_catalog(DEFAULT_CATALOG_PATH)
    assert catalog.default_plan.id == "free"
    assert [p.tier for p in catalog.plans.values()] == [0, 1, 2]
    assert catalog.plan("pro").family_pool
    expected = {
        "price_basic_monthly": ("basic", "usd"),
        "price_basic_yearly": ("basic", "usd"),
        "price_pro_monthly": ("pro", "usd"),
        "price_pro_yearly": ("pro", "usd"),
        "price_basic_monthly_eur": ("basic", "eur"),
        "price_pro_monthly_eur": ("pro", "eur"),
    }
    for price_id, (plan_id, currency) in expected.items():
        plan = catalog.plan_for_price(price_id)
        assert plan is not None and plan.id == plan_id
        assert plan.prices[price_id].currency == currency


def test_the_shipped_catalog_has_the_documented_policies() -> None:
    pro = load_catalog(DEFAULT_CATALOG_PATH).plan("pro")
    assert pro.dunning.retry_after_days == (1, 3, 5, 7)
    assert pro.dunning.escalate_to == "suspended"
    assert pro.access_policy["past_due"].grace_days == 7
    assert pro.features["seats"].member_cap == 1
    assert pro.features["export_pdf"].limit is None


def test_the_minimal_catalog_is_valid() -> None:
    catalog = parse_catalog(BASE)
    assert set(catalog.plans) == {"free", "basic"}
    assert catalog.plan("basic").features["api_calls"].limit == 100


def test_a_missing_file_is_a_catalog_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="nope.yaml: cannot read the catalog"):
        load_catalog(tmp_path / "nope.yaml")


def test_an_empty_file_is_a_catalog_error(tmp_path: Path) -> None:
    assert "the catalog is empty" in error_of(tmp_path, "")


def test_a_top_level_list_is_a_catalog_error(tmp_path: Path) -> None:
    assert "must be a mapping" in error_of(tmp_path, "- free\n")


def test_a_yaml_syntax_error_names_its_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, replace_line(7, "  us: {name: United States, currency: usd"))
    assert ":8: yaml:" in message


def test_a_duplicate_key_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    message = error_of(tmp_path, insert_after(12, "  free:\n    name: Again"))
    assert ":13: plans.free: duplicate key (first at line 9)" in message


# ---------------------------------------------------------------- validation rules


def test_an_unknown_top_level_key_is_an_error_on_its_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE + "extras: 1\n")
    assert ":21: extras: unknown key; expected one of: version, defaults, zones, plans" in message


def test_a_misspelt_key_is_an_error_suggesting_the_right_one(tmp_path: Path) -> None:
    text = replace_line(19, "      api_calls: {limit: 100, period: month, enforcment: soft}")
    message = error_of(tmp_path, text)
    assert ":19: plans.basic.features.api_calls.enforcment: unknown key" in message
    assert "did you mean 'enforcement'?" in message


def test_a_missing_required_key_points_at_the_line_of_its_parent(tmp_path: Path) -> None:
    message = error_of(tmp_path, replace_line(14, "    family_pool: false"))
    assert ":13: plans.basic.name: required key is missing" in message


def test_every_problem_is_reported_not_only_the_first(tmp_path: Path) -> None:
    text = replace_line(11, "    tier: -1")
    text = replace_line(
        17, "      price_basic: {zone: us, currency: usd, amount: 9.5, interval: month}", text
    )
    message = error_of(tmp_path, text)
    assert ":11: plans.free.tier:" in message
    assert ":17: plans.basic.prices.price_basic.amount:" in message
    assert len(message.splitlines()) == 2


def test_a_catalog_without_a_default_plan_is_rejected(tmp_path: Path) -> None:
    message = error_of(tmp_path, replace_line(12, "    default: false"))
    assert ":8: plans: no plan has default: true; exactly one must" in message


def test_a_second_default_plan_is_rejected_on_its_line(tmp_path: Path) -> None:
    text = BASE + "  family:\n    name: Family\n    tier: 2\n    default: true\n"
    message = error_of(tmp_path, text)
    assert ":24: plans.family.default: only one plan may be the default; also 'free'" in message


def test_a_price_id_listed_under_two_plans_is_rejected(tmp_path: Path) -> None:
    text = BASE + (
        "  pro:\n    name: Pro\n    tier: 2\n    prices:\n"
        "      price_basic: {zone: us, currency: usd, amount: 1900, interval: month}\n"
    )
    message = error_of(tmp_path, text)
    assert ":25: plans.pro.prices.price_basic: price id is also listed under plan 'basic'" in (
        message
    )


def test_a_price_in_an_unknown_zone_is_rejected(tmp_path: Path) -> None:
    text = replace_line(
        17, "      price_basic: {zone: eu, currency: usd, amount: 900, interval: month}"
    )
    assert ":17: plans.basic.prices.price_basic.zone: unknown zone 'eu'" in error_of(tmp_path, text)


def test_a_price_whose_currency_is_not_its_zones_is_rejected(tmp_path: Path) -> None:
    text = replace_line(
        17, "      price_basic: {zone: us, currency: eur, amount: 900, interval: month}"
    )
    message = error_of(tmp_path, text)
    assert ":17: plans.basic.prices.price_basic.currency: zone 'us' uses 'usd'" in message


def test_a_plan_id_with_capital_letters_is_rejected_on_its_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, replace_line(13, "  Basic:"))
    assert ":13: plans.Basic.id: String should match pattern" in message


def test_a_feature_code_with_spaces_is_rejected_on_its_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, replace_line(20, "      export pdf: {min_access: reduced}"))
    assert ":20: plans.basic.features.export pdf.code: String should match pattern" in message


def test_the_default_plan_cannot_have_prices(tmp_path: Path) -> None:
    text = insert_after(
        12, "    prices:\n      price_free: {zone: us, currency: usd, amount: 0, interval: month}"
    )
    message = error_of(tmp_path, text)
    assert ":13: plans.free.prices: the default plan is free and cannot have prices" in message


def test_member_cap_is_only_allowed_on_family_pool_plans(tmp_path: Path) -> None:
    text = replace_line(19, "      api_calls: {limit: 100, period: month, member_cap: 10}")
    message = error_of(tmp_path, text)
    assert ":19: plans.basic.features.api_calls.member_cap: member_cap needs family_pool" in message


def test_member_cap_is_allowed_on_a_family_pool_plan() -> None:
    text = insert_after(15, "    family_pool: true")
    text = replace_line(20, "      api_calls: {limit: 100, period: month, member_cap: 10}", text)
    assert parse_catalog(text).plan("basic").features["api_calls"].member_cap == 10


def test_a_limit_is_required_when_a_period_is_set(tmp_path: Path) -> None:
    message = error_of(tmp_path, replace_line(19, "      api_calls: {period: month}"))
    assert ":19: plans.basic.features.api_calls.limit: a limit is required when period" in message


def test_a_negative_limit_is_rejected(tmp_path: Path) -> None:
    message = error_of(tmp_path, replace_line(19, "      api_calls: {limit: -1, period: month}"))
    assert ":19: plans.basic.features.api_calls.limit: Input should be greater than" in message


def test_a_boolean_is_not_accepted_as_a_limit(tmp_path: Path) -> None:
    message = error_of(tmp_path, replace_line(19, "      api_calls: {limit: yes, period: month}"))
    assert ":19: plans.basic.features.api_calls.limit:" in message


def test_alerts_are_percentages_of_the_limit_or_amounts_rounded_up_to_whole_units() -> None:
    text = replace_line(19, "      api_calls: {limit: 5, period: month, alerts: [80%, 100 %, 1000]}")
    feature = parse_catalog(text).plan("basic").features["api_calls"]
    assert feature.alerts == ("80%", "100%", "1000")
    assert feature.thresholds(5) == [("80%", 4), ("100%", 5), ("1000", 1000)]
    assert feature.thresholds(None) == [("1000", 1000)]  # unlimited: only amounts apply


@pytest.mark.parametrize(
    ("alerts", "says"),
    [
        ("[80%, 0%]", "alerts.1: '0%' is no threshold"),
        ("[1001%]", "alerts.0: '1001%' is no threshold"),
        ("[80%, eighty]", "alerts.1: 'eighty' is no threshold"),
        ("[0]", "alerts.0: 0 is no threshold"),
        ("[yes]", "alerts.0: True is no threshold"),
        ("[80%, 80 %]", "alerts.1: threshold 80% is listed twice"),
        ("80%", "alerts: alerts must be a list"),
    ],
)
def test_a_bad_threshold_is_refused_on_its_line(tmp_path: Path, alerts: str, says: str) -> None:
    message = error_of(tmp_path, replace_line(19, f"      api_calls: {{limit: 100, period: month, alerts: {alerts}}}"))
    assert f":19: plans.basic.features.api_calls.{says}" in message


def test_a_threshold_in_a_block_list_is_refused_on_its_own_line(tmp_path: Path) -> None:
    text = replace_line(19, "      api_calls:\n        limit: 100\n        period: month\n        alerts:\n"
                            "          - 80%\n          - 150 percent")
    assert ":24: plans.basic.features.api_calls.alerts.1: '150 percent' is no threshold" in error_of(tmp_path, text)


def test_a_percentage_threshold_needs_a_limit(tmp_path: Path) -> None:
    message = error_of(tmp_path, replace_line(20, "      export_pdf: {min_access: reduced, alerts: [1000, 50%]}"))
    assert ":20: plans.basic.features.export_pdf.alerts.1: a percentage threshold (50%) needs a limit" in message


def test_an_unknown_status_in_the_access_policy_is_rejected(tmp_path: Path) -> None:
    message = error_of(tmp_path, replace_line(4, "    activ: full"))
    assert ":4: defaults.access_policy.activ: Input should be" in message


def test_an_access_level_that_does_not_exist_is_rejected(tmp_path: Path) -> None:
    message = error_of(tmp_path, replace_line(4, "    active: fullest"))
    assert ":4: defaults.access_policy.active.level: Input should be" in message


def test_a_grace_period_needs_a_level_to_fall_back_to(tmp_path: Path) -> None:
    message = error_of(tmp_path, replace_line(5, "    past_due: {level: full, grace_days: 7}"))
    assert ":5: defaults.access_policy.past_due.then: a grace period needs `then`" in message


def test_retry_days_must_increase(tmp_path: Path) -> None:
    text = insert_after(5, "  dunning:\n    retry_after_days: [3, 1]")
    message = error_of(tmp_path, text)
    assert ":7: defaults.dunning.retry_after_days: retry days must be strictly increasing" in (
        message
    )


def test_an_error_in_a_plan_override_names_the_plans_line(tmp_path: Path) -> None:
    text = insert_after(15, "    dunning:\n      escalate_to: deleted")
    assert ":17: plans.basic.dunning.escalate_to: Input should be" in error_of(tmp_path, text)


def test_models_refuse_unknown_fields_when_built_in_code() -> None:
    with pytest.raises(ValueError, match="Extra inputs"):
        Catalog.model_validate({"defaults": {"access_policy": {}}, "plans": {}, "x": 1})


# ---------------------------------------------------------------- inheritance


def test_plans_inherit_the_default_policies() -> None:
    basic = parse_catalog(BASE).plan("basic")
    assert basic.access_policy["past_due"].then == "reduced"
    assert basic.dunning.retry_after_days == (1, 3, 5, 7)


def test_a_plan_overrides_single_statuses_and_single_dunning_keys() -> None:
    text = insert_after(
        15,
        "    access_policy:\n      past_due: {level: full, grace_days: 14, then: blocked}\n"
        "    dunning:\n      grace_days: 3",
    )
    catalog = parse_catalog(text)
    basic, free = catalog.plan("basic"), catalog.plan("free")
    assert basic.access_policy["past_due"].grace_days == 14
    assert basic.access_policy["active"].level == "full"  # inherited, not replaced
    assert basic.dunning.grace_days == 3
    assert basic.dunning.retry_after_days == (1, 3, 5, 7)
    assert free.access_policy["past_due"].grace_days == 7


# ---------------------------------------------------------------- access policy


@pytest.fixture
def pro() -> Catalog:
    return load_catalog(DEFAULT_CATALOG_PATH)


def test_active_and_trialing_subscriptions_have_full_access(pro: Catalog) -> None:
    plan = pro.plan("pro")
    assert plan.access_for("active", 0) == "full"
    assert plan.access_for("trialing", 400 * DAY) == "full"


def test_past_due_is_grace_within_the_grace_days_and_reduced_after(pro: Catalog) -> None:
    plan = pro.plan("pro")
    assert plan.access_for("past_due", 0) == "grace"
    assert plan.access_for("past_due", 7 * DAY - 1) == "grace"
    assert plan.access_for("past_due", 7 * DAY) == "reduced"
    assert plan.access_for("past_due", 30 * DAY) == "reduced"


def test_unpaid_suspended_and_canceled_subscriptions_are_blocked(pro: Catalog) -> None:
    plan = pro.plan("pro")
    for status in ("unpaid", "suspended", "canceled", "incomplete", "paused"):
        assert plan.access_for(status, 0) == "blocked"


def test_a_status_the_policy_does_not_list_is_blocked(pro: Catalog) -> None:
    assert pro.plan("pro").access_for("something_new", 0) == "blocked"
    assert parse_catalog(BASE).plan("basic").access_for("trialing", 0) == "blocked"


# ---------------------------------------------------------------- features by access level


def test_full_and_grace_access_grant_every_feature(pro: Catalog) -> None:
    plan = pro.plan("pro")
    assert plan.features_at("full") == list(plan.features.values())
    assert plan.features_at("grace") == list(plan.features.values())


def test_reduced_access_grants_only_features_marked_reduced(pro: Catalog) -> None:
    codes = [f.code for f in pro.plan("pro").features_at("reduced")]
    assert codes == ["projects", "storage_mb", "seats", "export_pdf"]


def test_blocked_access_grants_nothing(pro: Catalog) -> None:
    assert pro.plan("pro").features_at("blocked") == []


def test_an_unknown_access_level_is_a_value_error(pro: Catalog) -> None:
    with pytest.raises(ValueError, match="unknown access level"):
        pro.plan("pro").features_at("partial")


# ---------------------------------------------------------------- catalog helpers


def test_an_unknown_price_maps_to_no_plan(pro: Catalog) -> None:
    assert pro.plan_for_price("price_nobody_sells") is None
    assert pro.price("price_nobody_sells") is None


def test_asking_for_an_unknown_plan_is_a_key_error(pro: Catalog) -> None:
    with pytest.raises(KeyError, match="no plan 'gold'"):
        pro.plan("gold")


# ---------------------------------------------------------------- named SQL files


def test_load_queries_splits_a_file_on_name_lines(tmp_path: Path) -> None:
    path = tmp_path / "q.sql"
    path.write_text(
        "-- header comment\n\n-- name: first\nSELECT 1;\n\n-- name: second\n"
        "-- what it does\nSELECT 2\nFROM t;\n"
    )
    assert load_queries(path) == {
        "first": "SELECT 1;",
        "second": "-- what it does\nSELECT 2\nFROM t;",
    }


def test_load_queries_rejects_a_duplicate_name_naming_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "q.sql"
    path.write_text("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")
    with pytest.raises(ValueError, match=r"q.sql:3: duplicate query name 'a' \(first at line 1\)"):
        load_queries(path)


def test_load_queries_rejects_sql_before_the_first_name(tmp_path: Path) -> None:
    path = tmp_path / "q.sql"
    path.write_text("SELECT 0;\n-- name: a\nSELECT 1;\n")
    with pytest.raises(ValueError, match="q.sql:1: SQL before the first"):
        load_queries(path)


def test_load_queries_rejects_a_name_without_sql(tmp_path: Path) -> None:
    path = tmp_path / "q.sql"
    path.write_text("-- name: a\n-- only a comment\n-- name: b\nSELECT 1;\n")
    with pytest.raises(ValueError, match="q.sql:1: query 'a' has no SQL"):
        load_queries(path)


def test_the_catalog_sql_file_holds_the_queries_apply_catalog_uses() -> None:
    names = set(load_queries(SQL_PATH))
    assert {"upsert_zone", "upsert_plan", "upsert_price", "upsert_feature"} <= names
    assert {"delete_stale_prices", "delete_stale_features", "referenced_plans"} <= names
