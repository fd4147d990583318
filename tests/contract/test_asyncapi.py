"""docs/asyncapi.yaml: valid for the AsyncAPI CLI, and true to the code it describes.

The CLI checks the document against the AsyncAPI 3.0 schema and its rules; the other
tests check what it cannot know: that every topic the service creates is described,
that each protobuf payload schema lists exactly its message's fields, and that the
CloudEvents sources it promises are the ones the producers set.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from payment.v1 import events_pb2
from shared.config import Topics
from shared.kafka import CE_SOURCES
from tests.support.tools import ROOT, tool

DOCUMENT = ROOT / "docs" / "asyncapi.yaml"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text())
    return loaded


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow local `$ref`s (`#/a/b`) until a node that is not one."""
    while "$ref" in node:
        found: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            found = found[part]
        node = found
    return node


def validate(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # The CLI sends usage metrics unless its config file says no: point it at one of
    # ours (no network, nothing written to the home directory).
    config = tmp_path / "asyncapi-analytics.json"
    config.write_text(json.dumps({"analyticsEnabled": "false", "infoMessageShown": "true", "userID": "tests"}))
    return subprocess.run(
        [tool("asyncapi"), "validate", str(path), "--fail-severity", "warn", "--diagnostics-format", "text"],
        capture_output=True, text=True, check=False, timeout=180,
        env={**os.environ, "HOME": str(tmp_path), "ASYNCAPI_METRICS_CONFIG_PATH": str(config)},
    )


def test_the_document_is_valid_asyncapi_3_for_the_cli(tmp_path: Path) -> None:
    done = validate(DOCUMENT, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is valid" in done.stdout, done.stdout


def test_the_cli_refuses_an_operation_on_a_channel_that_is_not_there(tmp_path: Path, document: dict[str, Any]) -> None:
    """So the test above can fail: a document with a dangling reference is refused."""
    broken = json.loads(json.dumps(document))
    broken["operations"]["publishPaymentEvent"]["channel"]["$ref"] = "#/channels/noSuchTopic"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken, sort_keys=False))
    done = validate(path, tmp_path)
    assert done.returncode != 0, done.stdout


def test_every_topic_the_service_creates_is_a_channel_and_nothing_else_is(document: dict[str, Any]) -> None:
    addresses = sorted(channel["address"] for channel in document["channels"].values())
    assert addresses == sorted(Topics().all())


def test_every_channel_says_its_delivery_and_order_and_every_message_its_key_headers_and_payload(
    document: dict[str, Any],
) -> None:
    sent = {op["channel"]["$ref"].rsplit("/", 1)[1] for op in document["operations"].values()}
    for name, channel in document["channels"].items():
        assert name in sent, f"no operation sends on {channel['address']}"
        assert channel["bindings"]["kafka"]["topic"] == channel["address"]
        assert channel["x-delivery"].startswith("at least once"), name
        assert "partition" in channel["x-ordering"], name
        for reference in channel["messages"].values():
            message = resolve(document, reference)
            assert message["bindings"]["kafka"]["key"]["description"], (name, message["name"])
            assert resolve(document, message["headers"]), (name, message["name"])
            assert resolve(document, message["payload"]), (name, message["name"])


def json_type(field: FieldDescriptor) -> dict[str, Any]:
    """The JSON Schema the document gives a decoded protobuf field."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return {"type": "object", "additionalProperties": {"type": "string"}}
    if field.type == FieldDescriptor.TYPE_ENUM:
        return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
    return {
        FieldDescriptor.TYPE_STRING: {"type": "string"},
        FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
        FieldDescriptor.TYPE_INT64: {"type": "integer", "format": "int64"},
        FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    }[field.type]


@pytest.mark.parametrize(
    "descriptor",
    [events_pb2.PaymentEvent.DESCRIPTOR, events_pb2.UsageEvent.DESCRIPTOR, events_pb2.UsageThresholdCrossed.DESCRIPTOR,
     events_pb2.DunningEvent.DESCRIPTOR],
    ids=lambda d: d.name,
)
def test_each_payload_schema_lists_exactly_the_fields_of_its_protobuf_message(
    document: dict[str, Any], descriptor: Descriptor
) -> None:
    schema = document["components"]["schemas"][descriptor.name]
    assert schema["x-protobuf-message"] == descriptor.full_name
    documented = {name: (prop["x-protobuf-field"], {k: prop[k] for k in prop if k in ("type", "format", "enum", "additionalProperties")})
                  for name, prop in schema["properties"].items()}
    declared = {field.name: (field.number, json_type(field)) for field in descriptor.fields}
    assert documented == declared


@pytest.mark.parametrize("message", ["PaymentEvent", "UsageEvent", "UsageThresholdCrossed", "DunningEvent", "StripeRawEvent"])
def test_the_documented_cloudevents_source_is_the_one_the_producers_set(document: dict[str, Any], message: str) -> None:
    headers = resolve(document, document["components"]["messages"][message]["headers"])
    parts = [resolve(document, part) for part in headers.get("allOf", [headers])]
    sources = [part["properties"]["ce_source"]["const"] for part in parts if "const" in part.get("properties", {}).get("ce_source", {})]
    assert sources == [CE_SOURCES["StripeEvent" if message == "StripeRawEvent" else message]]
