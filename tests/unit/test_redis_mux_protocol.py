"""The RESP encoding and parsing of shared/redis_mux.py, without a server: every reply
type, a reply cut at every byte (the parser must wait, not guess), and arguments of
each accepted type. The client against a real Redis: tests/integration/test_redis_mux.py."""

from __future__ import annotations

import pytest
from redis.exceptions import NoScriptError, ResponseError

from shared.redis_mux import Incomplete, encode, parse

REPLIES: list[tuple[bytes, object]] = [
    (b"+OK\r\n", b"OK"),
    (b":42\r\n", 42),
    (b":-7\r\n", -7),
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),  # a bulk string may hold CRLF: its length decides
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*3\r\n:1\r\n$1\r\nx\r\n*2\r\n:2\r\n$-1\r\n", [1, b"x", [2, None]]),
]


@pytest.mark.parametrize(("wire", "value"), REPLIES)
def test_each_reply_type_parses_to_what_redis_py_returns(wire: bytes, value: object) -> None:
    assert parse(wire, 0) == (value, len(wire))


@pytest.mark.parametrize(("wire", "value"), REPLIES)
def test_a_reply_cut_anywhere_is_incomplete_until_its_last_byte(wire: bytes, value: object) -> None:
    for cut in range(len(wire)):
        with pytest.raises(Incomplete):
            parse(wire[:cut], 0)
    # And parsed from the middle of a buffer, after another reply:
    assert parse(b"+OK\r\n" + wire, 5) == (value, 5 + len(wire))


def test_error_replies_are_returned_not_raised_and_noscript_is_told_apart() -> None:
    error, end = parse(b"-ERR wrong type\r\n", 0)
    assert isinstance(error, ResponseError) and not isinstance(error, NoScriptError)
    assert str(error) == "ERR wrong type" and end == 17
    noscript, _ = parse(b"-NOSCRIPT No matching script\r\n", 0)
    assert isinstance(noscript, NoScriptError)


def test_an_unknown_reply_type_is_a_connection_error() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    with pytest.raises(RedisConnectionError, match="cannot read"):
        parse(b"%1\r\n", 0)  # a RESP3 map: this client speaks RESP2 only


def test_arguments_are_encoded_as_bulk_strings() -> None:
    assert encode(("SET", b"k\r\n", 7, 1.5)) == b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n7\r\n$3\r\n1.5\r\n"
    assert encode(("GET", "ключ")) == b"*2\r\n$3\r\nGET\r\n$8\r\n" + "ключ".encode() + b"\r\n"
    with pytest.raises(TypeError, match="not bool"):
        encode(("SET", "k", True))  # redis-py refuses booleans too: 1 or "True"?
    with pytest.raises(TypeError, match="not NoneType"):
        encode(("SET", "k", None))
