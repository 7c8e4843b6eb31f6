"""The polite HTTP client: rate limit, Retry-After parsing, size limit, schemes, the total
deadline (against trickling servers), config."""
from __future__ import annotations

import email.utils
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_services import FakeServices
from pipeline.crawl.http import FetchError, HttpClient, HttpConfig, parse_retry_after
from pipeline.errors import ConfigError


def config(**overrides) -> HttpConfig:
    values = {"user_agent": "mmrns-tests/1.0 (test@example.org)", "concurrency": 4, "requests_per_second_per_host": 0,
              "max_attempts": 2, "backoff_base": 0.01, "backoff_max": 0.02, "connect_timeout": 1.0,
              "read_timeout": 1.0, "max_bytes": 1000, "max_redirects": 2, "host_down_after": 2}
    return HttpConfig(**{**values, **overrides})


@pytest.fixture
def services():
    server = FakeServices(lifetime=60).start()
    yield server
    server.stop()


def test_retry_after_seconds_and_http_date():
    assert parse_retry_after("7") == 7.0
    now = time.time()
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


HTTP_DATES = st.builds("{}, {} {} {} {}:{}:{} GMT".format, st.sampled_from(["Mon", "Xyz"]), st.integers(0, 99),
                       st.sampled_from(["Jan", "Feb", "Foo"]), st.integers(0, 10 ** 6), *[st.integers(0, 99)] * 3)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.one_of(st.text(), HTTP_DATES))
def test_retry_after_of_any_text_is_none_or_a_wait(value):
    wait = parse_retry_after(value)
    assert wait is None or wait >= 0


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_total_timeout_ends_an_answer_trickled_a_byte_at_a_time(services, phase):
    services.files["slow.jpg"] = b"x" * 200
    services.trickle["/files/slow.jpg"] = (0.1, phase)  # every read succeeds within read_timeout
    start = time.monotonic()
    with HttpClient(config(read_timeout=0.5, total_timeout=1.0, max_attempts=3)) as client, \
            pytest.raises(FetchError, match="within total_timeout 1 s") as error:
        client.fetch(f"{services.base}/files/slow.jpg")
    # the whole answer takes 20 s; the deadline ends it after 1 s (the upper bound leaves room for a loaded machine)
    assert 0.95 <= time.monotonic() - start < 5.0
    assert not error.value.unreachable and len(services.requests) == 1  # not retried


@pytest.mark.parametrize("fault, overrides", [
    ((429, {"Retry-After": "3"}, b""), {}),  # below max_retry_after, beyond the deadline
    ((503, {}, b""), {"backoff_base": 3.0, "backoff_max": 3.0}),
])
def test_a_wait_beyond_the_deadline_fails_at_once(services, fault, overrides):
    services.files["a.jpg"] = b"x"
    services.faults["/files/a.jpg"] = [fault]
    start = time.monotonic()
    with HttpClient(config(total_timeout=1.0, max_retry_after=10, **overrides)) as client, \
            pytest.raises(FetchError, match="within total_timeout 1 s"):
        client.fetch(f"{services.base}/files/a.jpg")
    assert time.monotonic() - start < 0.5


def test_a_slow_answer_within_the_deadline_is_kept(services):
    services.files["a.jpg"] = b"y" * 10
    services.trickle["/files/a.jpg"] = (0.05, "body")
    with HttpClient(config(total_timeout=5.0)) as client:
        assert client.fetch(f"{services.base}/files/a.jpg").content == b"y" * 10


def test_per_host_rate_limit_spaces_concurrent_requests(services):
    services.files["a.jpg"] = b"x"
    with HttpClient(config(requests_per_second_per_host=20)) as client, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: client.fetch(f"{services.base}/files/a.jpg"), range(6)))
    arrivals = sorted(t for t, _ in services.requests)
    assert len(arrivals) == 6
    assert arrivals[-1] - arrivals[0] >= 0.22  # 5 gaps of 1/20 s, minus scheduling slack


def test_user_agent_is_sent(services):
    seen = []

    class Echo(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers["User-Agent"])
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.handle_request, daemon=True).start()
    with HttpClient(config()) as client:
        client.fetch(f"http://127.0.0.1:{server.server_address[1]}/")
    server.server_close()
    assert seen == ["mmrns-tests/1.0 (test@example.org)"]


def test_body_without_content_length_is_aborted_beyond_max_bytes():
    class Endless(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # close-delimited body, no Content-Length

        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(1000):  # bounded: 1 MB at most
                    self.wfile.write(b"\0" * 1024)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.handle_request, daemon=True).start()
    with HttpClient(config()) as client, pytest.raises(FetchError, match="exceeds max_bytes 1000") as error:
        client.fetch(f"http://127.0.0.1:{server.server_address[1]}/big")
    server.server_close()
    assert not error.value.unreachable


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/a.jpg", "data:,x"])
def test_only_http_and_https(url):
    with HttpClient(config()) as client, pytest.raises(FetchError, match="refused URL scheme"):
        client.fetch(url)


def test_unreachable_host_is_marked_down_after_consecutive_connection_failures():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/x"
    with HttpClient(config()) as client:
        for _ in range(2):
            with pytest.raises(FetchError, match="cannot connect") as error:
                client.fetch(url)
            assert error.value.unreachable
        with pytest.raises(FetchError, match="is down") as error:
            client.fetch(url)
        assert error.value.unreachable and list(client.down_hosts()) == [url.split("/")[2]]


@pytest.mark.parametrize("field, value", [("user_agent", " "), ("concurrency", 0), ("read_timeout", 0),
                                          ("total_timeout", 0), ("max_bytes", 0), ("backoff_base", -1)])
def test_bad_config_is_a_config_error(field, value):
    with pytest.raises(ConfigError, match=field):
        config(**{field: value})
