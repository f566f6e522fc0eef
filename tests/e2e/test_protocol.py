"""Malformed and misplaced frames, sent by hand (CONTRACT sections 2 and 8).

Each case ends by checking that the proxy is alive and another client's calls still work.
"""

import random
import socket
import struct

import pytest

import harness


def _assert_proxy_serves(stack, clients):
    assert stack.proxy.alive(), f"rpc_proxy died\n{stack.proxy.output()}"
    conn = clients(stack.proxy.address)
    assert conn.echo("still serving") == "still serving"
    assert conn.whoami() == "A"


def _reply_or_close(raw):
    """The reply to a bad frame: a decoded message, or None when the proxy closed the
    connection. Silence fails the test."""
    try:
        payload = raw.recv_frame()
    except (socket.timeout, TimeoutError):
        pytest.fail("proxy neither replied nor closed the connection (silence)")
    except EOFError:
        return None  # closed in the middle of a frame: still not silence
    return None if payload is None else harness.decode_message(payload)


def _assert_protocol_error(reply, seqid=None):
    assert reply.mtype == harness.EXCEPTION, reply
    code, message = harness.decode_app_exception(reply.body)
    assert code == harness.PROTOCOL_ERROR, (code, message)
    assert message, "a protocol error should say what was wrong"
    if seqid is not None:
        assert reply.seqid == seqid


def _assert_call_works(raw, seqid):
    raw.send_message("echo:echo", harness.CALL, seqid, harness.string_args(f"ok-{seqid}"))
    reply = raw.recv_message()
    assert (reply.name, reply.mtype, reply.seqid) == ("echo", harness.REPLY, seqid), reply
    assert harness.decode_string_result(reply.body) == f"ok-{seqid}"


def test_non_strict_header_gets_protocol_error(echo_stack, clients):
    # Old-style header: i32 name length, name, i8 type, i32 seqid.
    payload = (
        struct.pack(">i", 9)
        + b"echo:echo"
        + struct.pack(">bi", harness.CALL, 5)
        + harness.string_args("x")
    )
    with harness.RawConnection(echo_stack.proxy.address) as raw:
        raw.send(harness.frame(payload))
        reply = _reply_or_close(raw)
        assert reply is not None, "a non-strict header must get a code-7 reply, not a close"
        _assert_protocol_error(reply)
    _assert_proxy_serves(echo_stack, clients)


def test_name_without_service_gets_exception_with_client_seqid(echo_stack, clients):
    with harness.RawConnection(echo_stack.proxy.address) as raw:
        raw.send_message("echo", harness.CALL, 4321, harness.string_args("x"))
        reply = raw.recv_message()  # a reply, not a closed connection
        assert reply.mtype == harness.EXCEPTION, reply
        assert reply.seqid == 4321
        code, message = harness.decode_app_exception(reply.body)
        assert code in (harness.PROTOCOL_ERROR, harness.UNKNOWN), (code, message)
        _assert_call_works(raw, 4322)
    _assert_proxy_serves(echo_stack, clients)


@pytest.mark.parametrize(
    "mtype",
    [harness.REPLY, harness.EXCEPTION, 5, 19, harness.STOP, harness.STOP_CONFIRM, 99],
    ids=["reply", "exception", "type5", "type19", "stop", "stop_confirm", "type99"],
)
def test_misplaced_message_type_gets_protocol_error_and_connection_stays(
    echo_stack, clients, mtype
):
    with harness.RawConnection(echo_stack.proxy.address) as raw:
        raw.send_message("echo:echo", mtype, 55, harness.EMPTY_STRUCT)
        reply = raw.recv_message()
        _assert_protocol_error(reply, seqid=55)
        _assert_call_works(raw, 56)
    _assert_proxy_serves(echo_stack, clients)


@pytest.mark.parametrize(
    "length",
    [0, -1, -(2**31), harness.DEFAULT_MAX_FRAME_SIZE + 1, 2**31 - 1],
    ids=["zero", "minus1", "min_i32", "max_plus_1", "max_i32"],
)
def test_bad_frame_length_is_refused_never_silent(echo_stack, clients, length):
    with harness.RawConnection(echo_stack.proxy.address) as raw:
        raw.send(struct.pack(">i", length) + b"\x80\x01\x00\x01")
        reply = _reply_or_close(raw)
        if reply is not None:
            _assert_protocol_error(reply)
    _assert_proxy_serves(echo_stack, clients)


def _garbage_cases():
    rng = random.Random(1234)
    noise = bytes([rng.randrange(0x00, 0x80)]) + bytes(rng.randrange(256) for _ in range(63))
    strict = struct.pack(">I", harness.VERSION_1 | harness.CALL)
    return {
        "http_request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "truncated_header": harness.frame(b"\x80\x01\x00\x01\x00\x00"),
        "name_past_frame_end": harness.frame(strict + struct.pack(">i", 1000) + b"echo:echo"),
        "negative_name_length": harness.frame(strict + struct.pack(">i", -5) + b"x" * 20),
        "bad_version": harness.frame(b"\x80\x02\x00\x01" + struct.pack(">i", 4) + b"e:ex"),
        "random_noise": harness.frame(noise),
    }


GARBAGE = _garbage_cases()


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_is_refused_never_silent(echo_stack, clients, name):
    with harness.RawConnection(echo_stack.proxy.address) as raw:
        raw.send(GARBAGE[name])
        reply = _reply_or_close(raw)
        if reply is not None:
            _assert_protocol_error(reply)
    _assert_proxy_serves(echo_stack, clients)


def test_half_frame_then_hangup(echo_stack, clients):
    with harness.RawConnection(echo_stack.proxy.address) as raw:
        raw.send(struct.pack(">i", 100) + b"\x80\x01\x00\x01")
    _assert_proxy_serves(echo_stack, clients)


def test_max_frame_size_setting(backends, proxies, clients):
    backends.start("A")
    proxy = proxies.start(max_frame_size=4096)
    conn = clients(proxy.address)
    assert conn.echo("s" * 1000) == "s" * 1000
    with harness.RawConnection(proxy.address) as raw:
        raw.send_message("echo:echo", harness.CALL, 9, harness.string_args("b" * 8000))
        reply = _reply_or_close(raw)
        if reply is not None:
            _assert_protocol_error(reply)
    assert conn.echo("after") == "after"
