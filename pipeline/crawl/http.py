"""A polite HTTP client for crawling: per-host rate limit, retries with back-off, size and
redirect limits, and fast failure for hosts that cannot be reached.

Built on :class:`httpx.Client` (thread-safe; the crawl driver calls it from a thread pool
whose size bounds the concurrency). Every request of :meth:`HttpClient.fetch` follows this
policy:

- only ``http``/``https`` URLs, checked again at every redirect hop; redirects are followed
  by hand, at most ``max_redirects`` hops;
- before each request the host's rate limiter waits so that requests to one host are at
  least ``1 / requests_per_second_per_host`` seconds apart (all threads share it);
- 429 and 5xx answers and read timeouts are retried up to ``max_attempts`` in total. The
  wait is the answer's ``Retry-After`` (seconds or HTTP date; it also pauses the whole
  host) or else ``min(backoff_max, backoff_base * 2**(attempt-1)) * U(0.5, 1.5)`` with the
  jitter ``U`` drawn from a ``random.Random(seed)``. A ``Retry-After`` above
  ``max_retry_after`` fails the request instead of waiting;
- connection failures (DNS, refused, connect timeout) are not retried: the request fails
  as *unreachable*, and after ``host_down_after`` consecutive connection failures the host
  is marked down for the life of the client, so later requests to it fail at once;
- the body is streamed and the request aborted beyond ``max_bytes``.
"""
from __future__ import annotations

import email.utils
import random
import threading
import time
from dataclasses import dataclass, field

import httpx

from pipeline.errors import ConfigError

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
ALLOWED_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class HttpConfig:
    """The ``crawl.http`` section of params.yaml."""

    user_agent: str
    concurrency: int = 8
    requests_per_second_per_host: float = 5.0  # 0 = no limit
    max_attempts: int = 4
    backoff_base: float = 1.0  # seconds
    backoff_max: float = 60.0
    max_retry_after: float = 120.0
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    host_down_after: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.user_agent.strip():
            raise ConfigError("crawl.http.user_agent must name the crawler and a contact (Wikimedia requires it)")
        for name in ("concurrency", "max_attempts", "max_bytes", "host_down_after"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"crawl.http.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("requests_per_second_per_host", "backoff_base", "backoff_max", "max_retry_after", "max_redirects"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"crawl.http.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("connect_timeout", "read_timeout"):
            if float(getattr(self, name)) <= 0:
                raise ConfigError(f"crawl.http.{name} must be > 0, got {getattr(self, name)!r}")


class FetchError(Exception):
    """A request that did not yield a usable answer.

    ``unreachable`` is True when the host could not be reached at all (retried on the next
    run); otherwise the failure is final for this run (``--retry-failed`` retries it).
    """

    def __init__(self, reason: str, unreachable: bool = False):
        super().__init__(reason)
        self.reason, self.unreachable = reason, unreachable


@dataclass(frozen=True)
class Response:
    url: str  # the final URL, after redirects
    status: int
    headers: httpx.Headers
    content: bytes


@dataclass
class _HostState:
    next_time: float = 0.0  # monotonic time before which no request may start
    connect_failures: int = 0  # consecutive
    down_reason: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class HttpClient:
    """Thread-safe polite client; see the module docstring for the policy."""

    def __init__(self, config: HttpConfig):
        self.config = config
        self._client = httpx.Client(
            headers={"User-Agent": config.user_agent},
            timeout=httpx.Timeout(config.read_timeout, connect=config.connect_timeout),
            limits=httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency),
            follow_redirects=False,
        )
        self._hosts: dict[str, _HostState] = {}
        self._hosts_lock = threading.Lock()
        self._rng = random.Random(config.seed)
        self._rng_lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def down_hosts(self) -> dict[str, str]:
        """Hosts marked down in this client's life -> the reason."""
        with self._hosts_lock:
            return {host: state.down_reason for host, state in self._hosts.items() if state.down_reason}

    def fetch(self, url: str, method: str = "GET", data: dict[str, str] | None = None,
              headers: dict[str, str] | None = None) -> Response:
        """The 2xx answer to ``url`` after redirects and retries; raises :class:`FetchError`."""
        for _ in range(self.config.max_redirects + 1):
            target = self._checked_url(url)
            response = self._request_with_retries(method, target, data, headers)
            if response.status not in REDIRECT_STATUSES:
                if 200 <= response.status < 300:
                    return response
                raise FetchError(f"HTTP {response.status} from {url}")
            location = response.headers.get("location")
            if not location:
                raise FetchError(f"HTTP {response.status} redirect without Location from {url}")
            url = str(target.join(location))
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, data = "GET", None
        raise FetchError(f"too many redirects (more than {self.config.max_redirects}) from {url}")

    def _checked_url(self, url: str) -> httpx.URL:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as error:
            raise FetchError(f"invalid URL {url!r}: {error}") from None
        if parsed.scheme not in ALLOWED_SCHEMES:
            raise FetchError(f"refused URL scheme {parsed.scheme!r} (only http/https): {url}")
        if not parsed.host:
            raise FetchError(f"URL without host: {url}")
        return parsed

    def _host(self, host: str) -> _HostState:
        with self._hosts_lock:
            return self._hosts.setdefault(host, _HostState())

    def _wait_turn(self, state: _HostState) -> None:
        """Block until this thread may send the next request to the host."""
        interval = 1.0 / self.config.requests_per_second_per_host if self.config.requests_per_second_per_host else 0.0
        with state.lock:
            now = time.monotonic()
            start = max(now, state.next_time)
            state.next_time = start + interval
        if start > now:
            time.sleep(start - now)

    def _backoff(self, attempt: int) -> float:
        with self._rng_lock:
            jitter = 0.5 + self._rng.random()
        return min(self.config.backoff_max, self.config.backoff_base * 2 ** (attempt - 1)) * jitter

    def _request_with_retries(self, method: str, url: httpx.URL, data, headers) -> Response:
        host = url.netloc.decode("ascii")
        state = self._host(host)
        attempts, attempt = self.config.max_attempts, 0
        while True:
            attempt += 1
            if state.down_reason:
                raise FetchError(f"host {host} is down: {state.down_reason}", unreachable=True)
            self._wait_turn(state)
            try:
                response = self._send(method, url, data, headers)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                reason = f"cannot connect to {host}: {type(error).__name__}: {error}"
                with state.lock:
                    state.connect_failures += 1
                    if state.connect_failures >= self.config.host_down_after and not state.down_reason:
                        state.down_reason = f"{state.connect_failures} consecutive connection failures ({reason})"
                raise FetchError(reason, unreachable=True) from None
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as error:
                if attempt == attempts:
                    raise FetchError(f"{type(error).__name__} from {url} after {attempts} attempts") from None
                time.sleep(self._backoff(attempt))
                continue
            with state.lock:
                state.connect_failures = 0
            if response.status not in RETRY_STATUSES:
                return response
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if retry_after is not None and retry_after > self.config.max_retry_after:
                raise FetchError(f"HTTP {response.status} from {url} with Retry-After {retry_after:.0f} s "
                                 f"(more than max_retry_after {self.config.max_retry_after:g} s)")
            if attempt == attempts:
                raise FetchError(f"HTTP {response.status} from {url} after {attempts} attempts")
            if retry_after is not None:
                with state.lock:  # the whole host waits, not only this request
                    state.next_time = max(state.next_time, time.monotonic() + retry_after)
            else:
                time.sleep(self._backoff(attempt))

    def _send(self, method: str, url: httpx.URL, data, headers) -> Response:
        limit = self.config.max_bytes
        with self._client.stream(method, url, data=data, headers=headers) as response:
            if response.status_code in REDIRECT_STATUSES or response.status_code in RETRY_STATUSES:
                return Response(str(url), response.status_code, response.headers, b"")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise FetchError(f"body of {url} is {declared} bytes, more than max_bytes {limit}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > limit:
                    raise FetchError(f"body of {url} exceeds max_bytes {limit}; download aborted")
            return Response(str(url), response.status_code, response.headers, bytes(body))
