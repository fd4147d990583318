"""What a PromQL expression refers to, checked against the metrics the code declares.

Alert rules and dashboards name metrics and labels as strings; nothing but a test
notices when a metric is renamed or a label dropped, and Prometheus then answers an
empty result forever (an alert that cannot fire). `problems(expr)` lists every name
an expression uses that the code does not serve.

The scanner knows PromQL's shape well enough for our expressions: string literals,
label matchers `{...}`, range and subquery brackets `[...]`, function calls, and the
label lists after `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`. It
is not a full parser; an expression it cannot read is a problem, never a pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import REGISTRY

import shared.metrics  # noqa: F401 - declares every metric in REGISTRY

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("domain", "services", "shared")

# Series Prometheus makes itself for every target (and the alerts it evaluates).
TARGET_LABELS = frozenset({"job", "instance"})
BUILTIN_SERIES: dict[str, frozenset[str]] = {
    "up": TARGET_LABELS,
    "scrape_duration_seconds": TARGET_LABELS,
    "scrape_samples_scraped": TARGET_LABELS,
    "ALERTS": TARGET_LABELS | {"alertname", "alertstate", "severity"},
}
LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
WORD_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(\x00\d+\x00)\s*,?')
_TOKEN = re.compile(r"\d[\w.]*|[a-zA-Z_:][a-zA-Z0-9_:]*|\x00\d+\x00|\{[^{}]*\}|\[[^\[\]]*\]|\S")


def declared_series() -> dict[str, frozenset[str]]:
    """Every series name the code's registry exposes (with `_total`, `_bucket`, ...) and
    its label names, plus the series Prometheus adds for every target."""
    series = dict(BUILTIN_SERIES)
    # prometheus_client keeps no public map from exposed name to collector.
    for name, collector in REGISTRY._names_to_collectors.items():  # noqa: SLF001
        if name == getattr(collector, "_name", None) and getattr(collector, "_type", "") != "gauge":
            continue  # a counter or histogram is only served with its suffixes
        labels = frozenset(getattr(collector, "_labelnames", ())) | TARGET_LABELS
        if name.endswith("_bucket"):
            labels |= {"le"}
        series[name] = labels
    return series


def _source_strings() -> frozenset[str]:
    found: set[str] = set()
    for folder in SOURCE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            found.update(m.group(0)[1:-1] for m in _STRING.finditer(path.read_text()))
    return frozenset(found)


@dataclass
class Reference:
    metric: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)


@dataclass
class Scan:
    references: list[Reference] = field(default_factory=list)
    grouping_labels: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


def scan(expr: str) -> Scan:
    """The metrics (with their matchers) and grouping labels `expr` names."""
    strings: list[str] = []

    def hide(match: re.Match[str]) -> str:
        strings.append(match.group(0)[1:-1])
        return f"\x00{len(strings) - 1}\x00"

    text = _STRING.sub(hide, expr)
    tokens = _TOKEN.findall(text)
    result = Scan()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token in LIST_KEYWORDS:
            if following == "(":
                j = i + 2
                while j < len(tokens) and tokens[j] != ")":
                    if tokens[j] != ",":
                        result.grouping_labels.add(tokens[j])
                    j += 1
                i = j
        elif token.startswith("{"):
            # A selector with no name in front, e.g. {__name__=~"..."}: not ours to allow.
            result.errors.append(f"a selector without a metric name: {token}")
        elif re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", token) and token not in WORD_KEYWORDS:
            if following == "(" or following in ("by", "without"):
                pass  # a function or an aggregation
            else:
                reference = Reference(token)
                if following.startswith("{"):
                    body = following[1:-1]
                    for m in _MATCHER.finditer(body):
                        reference.matchers.append((m.group(1), m.group(2), strings[int(m.group(3).strip("\x00"))]))
                    if _MATCHER.sub("", body).strip():
                        result.errors.append(f"unreadable matchers in {token}{{{body}}}")
                    i += 1
                result.references.append(reference)
        i += 1
    return result


def problems(expr: str, series: dict[str, frozenset[str]] | None = None,
             source_strings: Iterable[str] | None = None) -> list[str]:
    """Names in `expr` that the code does not serve: unknown metrics, labels a metric does
    not have, grouping labels none of the expression's metrics has, and label values
    matched with `=` that appear nowhere in the source as a string literal."""
    series = declared_series() if series is None else series
    strings = frozenset(_source_strings() if source_strings is None else source_strings)
    found = scan(expr)
    out = list(found.errors)
    if not found.references:
        out.append(f"no metric named in {expr!r}")
    known_labels: set[str] = set()
    for ref in found.references:
        if ref.metric not in series:
            out.append(f"unknown metric {ref.metric}")
            continue
        known_labels |= series[ref.metric]
        for label, op, value in ref.matchers:
            if label not in series[ref.metric]:
                out.append(f"{ref.metric} has no label {label}")
            elif (op == "=" and ref.metric not in BUILTIN_SERIES and label not in TARGET_LABELS
                  and "$" not in value and value not in strings):
                out.append(f'{ref.metric}{{{label}="{value}"}}: the code never uses the value {value!r}')
    for label in sorted(found.grouping_labels - known_labels):
        out.append(f"grouping by {label}, a label none of the expression's metrics has")
    return out
