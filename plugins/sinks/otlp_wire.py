"""The OTLP/HTTP bytes: a request's body in either encoding, and what an answer's body says —
a partial success, or the ``google.rpc.Status`` an error carries.

OTLP/JSON is the protobuf JSON mapping with two rules of OTLP's own that matter for metrics:
enum values as integers, and lowerCamelCase keys (64-bit integers are decimal strings, which OTLP
receivers accept).
"""

from __future__ import annotations

import orjson
from google.protobuf import empty_pb2, json_format, unknown_fields
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

CONTENT_TYPES = {"protobuf": "application/x-protobuf", "json": "application/json"}


def serialize(request: ExportMetricsServiceRequest, encoding: str) -> bytes:
    """The request body: binary protobuf, or OTLP/JSON (the protobuf JSON mapping with enums as
    integers, as the OTLP spec requires)."""
    if encoding == "json":
        return orjson.dumps(json_format.MessageToDict(request, use_integers_for_enums=True))
    return request.SerializeToString()


def partial_success(body: bytes, encoding: str) -> tuple[int, str] | None:
    """(rejected data points, the server's message) from a successful export's answer, when it
    reports a partial success or a warning; None for a full success or an unreadable body."""
    response = ExportMetricsServiceResponse()
    try:
        if encoding == "json":
            json_format.Parse(body or b"{}", response, ignore_unknown_fields=True)
        else:
            response.ParseFromString(body)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError):
        return None
    if not response.HasField("partial_success"):
        return None
    partial = response.partial_success
    if partial.rejected_data_points == 0 and not partial.error_message:
        return None
    return partial.rejected_data_points, partial.error_message


def status_message(body: bytes, encoding: str) -> str | None:
    """The ``message`` of the ``google.rpc.Status`` an OTLP server answers errors with; None if the
    body is not one. (Read as unknown fields of an empty message: ``opentelemetry-proto`` does not
    ship the Status type, and ``message`` is its field 2, a string.)"""
    if encoding == "json":
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        message = parsed.get("message") if isinstance(parsed, dict) else None
        return message if isinstance(message, str) else None
    try:
        fields = unknown_fields.UnknownFieldSet(empty_pb2.Empty.FromString(body))
    except DecodeError:
        return None
    for index in range(len(fields)):
        field = fields[index]
        if field.field_number == 2 and field.wire_type == 2:  # wire type 2: length-delimited
            try:
                text: str = field.data.decode("utf-8")
            except UnicodeDecodeError:
                return None
            return text
    return None
