"""fedrec's changes to Flower's internals (fedrec.common.flower_patches): made on the Flower
releases they were verified on, none on any other (stock Flower, with one warning)."""

from __future__ import annotations

import logging

import pytest

from fedrec.common import flower_patches


def flower_state() -> dict:
    """Everything of Flower's that a patch changes."""
    from flwr.supercore import heartbeat
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.retry import grpc_retry, http_retry
    from flwr.supernode import fleet_http_connection
    from flwr.supernode import start_client_internal as loop

    return {
        "pull backoff": dict(inflatable_utils.pull_objects.__kwdefaults__),
        "tree pull backoff": dict(
            inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__
        ),
        "supernode clock": loop.time,
        "push": loop._push_messages,
        "pull": loop._pull_and_store_message,
        "heartbeat": (
            fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL,
            heartbeat.HEARTBEAT_DEFAULT_INTERVAL,
        ),
        "retry cap": (http_retry.MAX_RETRY_DELAY, grpc_retry.MAX_RETRY_DELAY),
        "retry invoker": fleet_http_connection.make_simple_http_retry_invoker,
    }


@pytest.fixture
def restored(monkeypatch):
    """Flower as it was, after the test (the patches change module state for good)."""
    from flwr.supercore import heartbeat
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.retry import grpc_retry, http_retry
    from flwr.supernode import fleet_http_connection
    from flwr.supernode import start_client_internal as loop

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        for key in ("initial_backoff", "backoff_cap"):
            monkeypatch.setitem(fn.__kwdefaults__, key, fn.__kwdefaults__[key])
    for module, name in (
        (loop, "time"),
        (loop, "_push_messages"),
        (loop, "_pull_and_store_message"),
        (fleet_http_connection, "HEARTBEAT_DEFAULT_INTERVAL"),
        (heartbeat, "HEARTBEAT_DEFAULT_INTERVAL"),
        (http_retry, "MAX_RETRY_DELAY"),
        (grpc_retry, "MAX_RETRY_DELAY"),
        (fleet_http_connection, "make_simple_http_retry_invoker"),
    ):
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(flower_patches, "_warned", False)


def apply_every_patch() -> list[bool]:
    return [
        flower_patches.shorten_pull_backoff(),
        flower_patches.set_supernode_clock(object()),
        flower_patches.after_each_reply(lambda: None),
        flower_patches.after_each_message(lambda: None),
        flower_patches.set_heartbeat_interval(12.0),
        flower_patches.cap_retry_backoff(2.0),
        flower_patches.check_failed_requests(lambda exc: None),
        flower_patches.retry_transient_errors_of_supernode(),
    ]


def own_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == flower_patches.__name__]


def test_the_installed_flower_is_a_verified_release():
    import flwr

    assert flower_patches.flower_version() == flwr.__version__
    assert flower_patches.is_verified(flwr.__version__)
    assert flower_patches.is_verified("1.42.7") and flower_patches.is_verified("1.42.0rc1")
    for other in ("1.41.2", "1.43.0", "2.42.0", "nightly"):
        assert not flower_patches.is_verified(other)


def test_every_patch_applies_on_the_installed_flower(restored, caplog):
    before = flower_state()
    with caplog.at_level(logging.WARNING, logger=flower_patches.__name__):
        assert all(apply_every_patch())
    after = flower_state()
    assert [key for key in before if after[key] == before[key]] == []
    assert after["pull backoff"]["initial_backoff"] == 0.05
    assert after["heartbeat"] == (12.0, 12.0) and after["retry cap"] == (2.0, 2.0)
    assert own_records(caplog) == []


def test_on_another_flower_release_nothing_is_patched_and_one_warning_says_so(
    restored, monkeypatch, caplog
):
    monkeypatch.setattr(flower_patches, "flower_version", lambda: "1.43.0")
    before = flower_state()
    with caplog.at_level(logging.WARNING, logger=flower_patches.__name__):
        assert not any(apply_every_patch())
        assert not any(apply_every_patch())
    assert flower_state() == before
    (warning,) = own_records(caplog)
    assert warning.levelno == logging.WARNING
    assert "Flower 1.43.0" in warning.getMessage() and "1.42.x" in warning.getMessage()


def flaky(failures: list[Exception]):
    """A request that fails with each of `failures` in turn, then answers."""
    calls = []

    def request():
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return "answered"

    return request


def test_transient_superlink_failures_are_retried_and_a_failed_handshake_is_not(monkeypatch):
    """Flower's own retry invoker, as the ServerApp's grid and the SuperNode use it: a
    connection the SuperLink closed mid-request (the error that ended a deployed run) and
    an HTTP 500 (its SQLite state locked: the error that lost a device's reply) are retried;
    a certificate that does not verify or a 4xx still end it at once, and so does a peer
    that keeps failing."""
    import httpx
    from flwr.supercore.retry import make_simple_http_retry_invoker

    dropped = httpx.ReadError(
        "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol (_ssl.c:1006)"
    )
    handshake = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")

    def invoker(patched: bool):
        made = make_simple_http_retry_invoker()
        made.wait_function = lambda seconds: None
        return flower_patches.retry_transient_errors(made) if patched else made

    with pytest.raises(httpx.ReadError):  # stock Flower: the run would end here
        invoker(False).invoke(flaky([dropped]))
    assert invoker(True).invoke(flaky([dropped, dropped])) == "answered"
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        invoker(True).invoke(flaky([handshake]))
    always = [dropped] * (flower_patches.TRANSIENT_RETRIES + 1)
    with pytest.raises(httpx.ReadError):
        invoker(True).invoke(flaky(always))

    def status(code: int) -> httpx.HTTPStatusError:
        request = httpx.Request("POST", "https://127.0.0.1:9092/v1/fleet/push-messages")
        response = httpx.Response(code, json={"detail": "Internal server error"}, request=request)
        return httpx.HTTPStatusError(f"Server error '{code}'", request=request, response=response)

    with pytest.raises(httpx.HTTPStatusError):  # stock Flower: the device's reply is lost
        invoker(False).invoke(flaky([status(500)]))
    assert invoker(True).invoke(flaky([status(500), dropped, status(500)])) == "answered"
    with pytest.raises(httpx.HTTPStatusError, match="400"):
        invoker(True).invoke(flaky([status(400)]))


def test_the_serverapps_grid_retries_dropped_connections():
    from flwr.superlink.grid.http_grid import HttpGrid

    grid = HttpGrid(token="t")
    stock = grid._retry_invoker.should_giveup
    assert flower_patches.retry_transient_errors_of_grid(grid)
    assert grid._retry_invoker.should_giveup is not stock
    assert not flower_patches.retry_transient_errors_of_grid(object())  # in memory: nothing to drop


def test_on_another_flower_release_the_device_runs_flowers_own_executor(
    restored, monkeypatch, caplog
):
    """The warm executor becomes `flower-superexec` before it loads anything or tells the
    SuperNode its PID."""
    from fedrec.client import warm_exec

    class Replaced(Exception):
        pass

    def exec_stock(address, parent_pid):
        raise Replaced(address, parent_pid)

    monkeypatch.setattr(flower_patches, "flower_version", lambda: "1.43.0")
    monkeypatch.setattr(flower_patches, "exec_stock_executor", exec_stock)
    monkeypatch.setattr(warm_exec, "_warm_up", lambda *a: pytest.fail("warmed up"))
    with pytest.raises(Replaced) as replaced:
        warm_exec.main(["--runtime-api-address", "127.0.0.1:9094", "--parent-pid", "42"])
    assert replaced.value.args == ("127.0.0.1:9094", 42)
    assert len(own_records(caplog)) == 1
