"""The explanation the writer stores in each answer (domain/entitlements.py): the catalog
rule that decided, in the forms the proto documents, and the plan's version."""

from __future__ import annotations

from dataclasses import replace

from domain.entitlements import SubjectRow, Version, answer, plan_version, rule_text
from shared.catalog import load_catalog, parse_catalog
from shared.config import DEFAULT_CATALOG_PATH

CATALOG = load_catalog(DEFAULT_CATALOG_PATH)
BASIC = CATALOG.plan("basic")
ROW = SubjectRow("user", "u1", "api_calls", "subscription", "sub_1", "basic", "active", "full", 50000,
                 "billing_period", "hard", None, Version(10, "evt_1"), "active", 10)


def test_the_rule_names_the_status_and_its_access_rule() -> None:
    assert rule_text(ROW, BASIC) == "active: full"
    grace = replace(ROW, access_level="grace", subscription_status="past_due")
    assert rule_text(grace, BASIC) == "past_due: grace 7 days, then reduced"


def test_a_feature_the_level_lacks_says_what_it_needs() -> None:
    suspended = replace(ROW, status="suspended", access_level="reduced", subscription_status="past_due")
    assert rule_text(suspended, BASIC) == "past_due: grace 7 days, then reduced; api_calls needs full"


def test_revoked_unlisted_and_one_time_rows() -> None:
    assert rule_text(replace(ROW, status="revoked", subscription_status="canceled"), BASIC) == "canceled: revoked"
    assert rule_text(replace(ROW, subscription_status="paused"), BASIC) == "paused: blocked"
    assert rule_text(replace(ROW, subscription_status="weird"), BASIC) == "weird: not in the access policy, blocked"
    assert rule_text(replace(ROW, source_type="checkout", subscription_status=None), BASIC) == "one_time: full"


def test_the_plan_version_changes_with_the_plan_and_only_then() -> None:
    again = load_catalog(DEFAULT_CATALOG_PATH).plan("basic")
    assert plan_version(BASIC) == plan_version(again) == answer(ROW, CATALOG)["plan_version"]
    text = DEFAULT_CATALOG_PATH.read_text().replace("limit: 50000", "limit: 60000")
    assert plan_version(parse_catalog(text).plan("basic")) != plan_version(BASIC)
    assert answer(ROW, CATALOG)["rule"] == "active: full"
