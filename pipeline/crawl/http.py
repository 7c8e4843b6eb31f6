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
- the body is streamed and the request aborted beyond ``max_bytes``;
- ``total_timeout`` bounds the whole fetch: every redirect hop, attempt, back-off and
  rate-limit wait. Each connect, TLS handshake, read and write is given at most the time
  left (a custom httpcore network backend, :class:`_DeadlineBackend`), so a server that
  trickles a byte every few seconds cannot hold a request open; a wait that would end
  after the deadline fails at once. A fetch past its deadline fails, not retried.

Every failure is a :class:`FetchError` with a one-line reason: an answer that fails content
decoding, a malformed or undecodable URL or redirect ``Location`` (e.g. an invalid
internationalised host name) and any other ``httpx`` error included.
"""
from __future__ import annotations

import contextlib
import email.utils
import random
import threading
import time
from dataclasses import dataclass, field

import httpcore
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
    total_timeout: float = 180.0  # seconds: deadline of one fetch, all hops, attempts and waits included
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
        for name in ("connect_timeout", "read_timeout", "total_timeout"):
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
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's socket backend with every connect, TLS handshake, read and write bounded by
    the calling thread's deadline (set by :meth:`deadline`; none outside it)."""

    def __init__(self):
        self._sockets = httpcore.SyncBackend()
        self._local = threading.local()

    @contextlib.contextmanager
    def deadline(self, at: float):
        """Socket operations of this thread end by ``time.monotonic()`` value ``at``."""
        self._local.at = at
        try:
            yield
        finally:
            self._local.at = None

    def bound(self, timeout: float | None, error: type[Exception]) -> float | None:
        """``timeout`` shortened to the time left; ``error`` when none is left."""
        at = getattr(self._local, "at", None)
        if at is None:
            return timeout
        left = at - time.monotonic()
        if left <= 0:
            raise error("total_timeout reached")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        stream = self._sockets.connect_tcp(host, port, self.bound(timeout, httpcore.ConnectTimeout),
                                           local_address, socket_options)
        return _DeadlineStream(stream, self)

    def sleep(self, seconds: float) -> None:
        self._sockets.sleep(seconds)


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation is bounded by its backend's deadline."""

    def __init__(self, stream: httpcore.NetworkStream, backend: _DeadlineBackend):
        self._stream, self._backend = stream, backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._backend.bound(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._backend.bound(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        stream = self._stream.start_tls(ssl_context, server_hostname, self._backend.bound(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(stream, self._backend)

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


def _use_backend(client: httpx.Client, backend: _DeadlineBackend) -> None:
    """Make every transport of ``client`` (direct, and proxies from the environment) open its
    connections through ``backend``. httpx 0.28 has no public hook for this."""
    for transport in (client._transport, *client._mounts.values()):
        pool = getattr(transport, "_pool", None)
        if transport is not None and not hasattr(pool, "_network_backend"):
            raise RuntimeError(f"cannot install the deadline backend into {type(transport).__name__} "
                               f"(httpx {httpx.__version__}): crawl.http.total_timeout needs httpx 0.28")
        if transport is not None:
            pool._network_backend = backend


class HttpClient:
    """Thread-safe polite client; see the module docstring for the policy."""

    def __init__(self, config: HttpConfig):
        self.config = config
        self._client = httpx.Client(
            headers={"User-Agent": config.user_agent},
            timeout=httpx.Timeout(config.read_timeout, connect=config.connect_timeout),
            limits=httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency),
            follow_redirects=False,
            event_hooks={"response": [self._check_location]},
        )
        self._backend = _DeadlineBackend()
        _use_backend(self._client, self._backend)
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
        """The 2xx answer to ``url`` after redirects and retries, within ``total_timeout``;
        raises :class:`FetchError`."""
        deadline = time.monotonic() + self.config.total_timeout
        with self._backend.deadline(deadline):
            target = self._checked_url(url)
            for _ in range(self.config.max_redirects + 1):
                response = self._request_with_retries(method, target, data, headers, deadline)
                if response.status not in REDIRECT_STATUSES:
                    if 200 <= response.status < 300:
                        return response
                    raise FetchError(f"HTTP {response.status} from {target}")
                location = response.headers.get("location")
                if not location:
                    raise FetchError(f"HTTP {response.status} redirect without Location from {target}")
                target = self._checked_url(location, base=target)
                if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                    method, data = "GET", None
        raise FetchError(f"too many redirects (more than {self.config.max_redirects}) from {url}")

    def _check_location(self, response: httpx.Response) -> None:
        """Refuse a redirect's invalid ``Location`` before httpx builds the next request from it
        (which it does even without following redirects, and fails on e.g. a bad IDNA host)."""
        if response.status_code in REDIRECT_STATUSES and "location" in response.headers:
            self._checked_url(response.headers["location"], base=response.request.url)

    @staticmethod
    def _checked_url(url: str, base: httpx.URL | None = None) -> httpx.URL:
        """``url`` (resolved against ``base``, a redirect's origin) as an http(s) URL with a
        valid host name; :class:`FetchError` otherwise."""
        what = "redirect Location" if base is not None else "URL"
        try:
            parsed = base.join(url) if base is not None else httpx.URL(url)
            host = parsed.host  # decodes an internationalised (IDNA) host name; may raise
        except (httpx.InvalidURL, TypeError, ValueError) as error:  # ValueError: UnicodeError, idna.IDNAError
            raise FetchError(f"invalid {what} {url!r}: {type(error).__name__}: {error}") from None
        if parsed.scheme not in ALLOWED_SCHEMES:
            raise FetchError(f"refused URL scheme {parsed.scheme!r} (only http/https): {url}")
        if not host:
            raise FetchError(f"{what} without host: {url}")
        return parsed

    def _host(self, host: str) -> _HostState:
        with self._hosts_lock:
            return self._hosts.setdefault(host, _HostState())

    def _wait_turn(self, state: _HostState, url: httpx.URL, deadline: float) -> None:
        """Block until this thread may send the next request to the host."""
        interval = 1.0 / self.config.requests_per_second_per_host if self.config.requests_per_second_per_host else 0.0
        with state.lock:
            now = time.monotonic()
            start = max(now, state.next_time)
            if start >= deadline:
                raise FetchError(self._past_deadline(url, f"the host's rate limit allows the next request in "
                                                          f"{start - now:.0f} s"))
            state.next_time = start + interval
        if start > now:
            time.sleep(start - now)

    def _sleep(self, seconds: float, url: httpx.URL, deadline: float) -> None:
        """A back-off wait; :class:`FetchError` at once if it would pass the deadline."""
        if time.monotonic() + seconds >= deadline:
            raise FetchError(self._past_deadline(url, f"the next attempt is due in {seconds:.0f} s"))
        time.sleep(seconds)

    def _past_deadline(self, url: httpx.URL, why: str = "") -> str:
        return (f"no complete answer from {url} within total_timeout {self.config.total_timeout:g} s"
                + (f" ({why})" if why else ""))

    def _backoff(self, attempt: int) -> float:
        with self._rng_lock:
            jitter = 0.5 + self._rng.random()
        return min(self.config.backoff_max, self.config.backoff_base * 2 ** (attempt - 1)) * jitter

    def _request_with_retries(self, method: str, url: httpx.URL, data, headers, deadline: float) -> Response:
        host = url.netloc.decode("ascii")
        state = self._host(host)
        attempts, attempt = self.config.max_attempts, 0
        while True:
            attempt += 1
            if state.down_reason:
                raise FetchError(f"host {host} is down: {state.down_reason}", unreachable=True)
            self._wait_turn(state, url, deadline)
            try:
                response = self._send(method, url, data, headers)
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as error:
                if time.monotonic() >= deadline:
                    raise FetchError(self._past_deadline(url)) from None
                if not isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
                    if attempt == attempts:
                        raise FetchError(f"{type(error).__name__} from {url} after {attempts} attempts") from None
                    self._sleep(self._backoff(attempt), url, deadline)
                    continue
                reason = f"cannot connect to {host}: {type(error).__name__}: {error}"
                with state.lock:
                    state.connect_failures += 1
                    if state.connect_failures >= self.config.host_down_after and not state.down_reason:
                        state.down_reason = f"{state.connect_failures} consecutive connection failures ({reason})"
                raise FetchError(reason, unreachable=True) from None
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
                self._sleep(self._backoff(attempt), url, deadline)

    def _send(self, method: str, url: httpx.URL, data, headers) -> Response:
        """One request. Timeouts, network and protocol errors propagate (retried by the
        caller); every other httpx error is a :class:`FetchError`."""
        limit = self.config.max_bytes
        try:
            with self._client.stream(method, url, data=data, headers=headers) as response:
                if response.status_code in REDIRECT_STATUSES or response.status_code in RETRY_STATUSES:
                    return Response(str(url), response.status_code, response.headers, b"")
                declared = response.headers.get("content-length", "")
                if declared.isascii() and declared.isdigit() and int(declared) > limit:
                    raise FetchError(f"body of {url} is {declared} bytes, more than max_bytes {limit}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise FetchError(f"body of {url} exceeds max_bytes {limit}; download aborted")
                return Response(str(url), response.status_code, response.headers, bytes(body))
        except httpx.DecodingError as error:
            raise FetchError(f"body of {url} fails content decoding (Content-Encoding): {error}") from None
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError):
            raise
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as error:
            raise FetchError(f"unusable answer from {url}: {type(error).__name__}: {error}") from None
