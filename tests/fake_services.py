"""Loopback stand-ins for DBpedia SPARQL, the Wikidata API and Wikimedia Commons, for the
crawl tests and benchmark. A threading HTTP server on 127.0.0.1 (port chosen by the OS)
that answers in the real services' formats and injects faults on chosen paths.

- ``POST /sparql`` (form ``query``): SPARQL 1.1 JSON results. A query mentioning
  ``dbo:abstract`` gets ``?e ?abstract`` rows from :attr:`FakeServices.abstracts`; any
  other gets ``?e ?p ?o`` rows (foaf:depiction, dbo:thumbnail, owl:sameAs) from
  :attr:`depictions` and :attr:`same_as`. Entities are read from ``VALUES ?e { <...> }``;
  like a real endpoint, a query whose block is not a list of valid ``IRIREF`` terms (a
  character the SPARQL grammar excludes, unescaped) is answered ``400``.
- ``GET /w/api.php?action=wbgetentities&ids=Q1|Q2``: Wikidata entity JSON with ``P18``
  claims from :attr:`p18` (``{"missing": ""}`` for unknown ids).
- ``GET /wiki/Special:FilePath/NAME``: 302 to ``/files/NAME`` (as Commons redirects to
  upload.wikimedia.org).
- ``GET /files/NAME``: the bytes in :attr:`files`.

Faults: :attr:`faults` maps a path to a list of responses ``(status, headers, body)``
served (and consumed) before the normal answer; :attr:`delays` maps a path prefix to
seconds slept before answering (a slow or timing-out endpoint); :attr:`trickle` maps a path
to ``(seconds, phase)``: the answer is written one byte every ``seconds``, from its first
byte (``phase="headers"``) or from the body's (``"body"``).

:attr:`hits` counts completed answers per item: per path for files and redirects, per
entity IRI (``sparql:abstract:<iri>``/``sparql:image:<iri>``) and per Wikidata id
(``wikidata:Q1``). An answer whose client went away during the delay is not counted (it
was never delivered). The server stops by itself after ``lifetime`` seconds.
"""
from __future__ import annotations

import io
import json
import re
import select
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

DEPICTION = "http://xmlns.com/foaf/0.1/depiction"
THUMBNAIL = "http://dbpedia.org/ontology/thumbnail"
SAME_AS = "http://www.w3.org/2002/07/owl#sameAs"
FILE_PATH = "/wiki/Special:FilePath/"
IRIREFS = re.compile(r'\s*(?:<[^<>"{}|^`\\\x00-\x20]*>\s*)*')  # SPARQL 1.1 IRIREF terms, space separated


def image_bytes(size=(64, 48), color=(200, 30, 30), fmt="JPEG", mode="RGB") -> bytes:
    """Real encoded image bytes made with Pillow (a gradient, so JPEGs differ by color)."""
    image = Image.new(mode, size, color if mode == "RGB" else None)
    if mode == "RGB":
        for x in range(size[0]):
            image.putpixel((x, 0), (x % 256, 255 - x % 256, 0))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def decoder_bug_images() -> dict[str, bytes]:
    """Malformed files of rarer formats on which Pillow's decoder raises something other
    than its usual errors (found by fuzzing Pillow 13): name -> bytes."""
    dds = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(dds, format="DDS")
    dds = bytearray(dds.getvalue())
    struct.pack_into("<I", dds, 80, 0)  # pixel format flags 0: NotImplementedError
    spider = io.BytesIO()
    Image.new("F", (8, 8)).save(spider, format="SPIDER")
    spider = bytearray(spider.getvalue())
    struct.pack_into("<f", spider, 26 * 4, 1.0)  # image number 1 of no stack: AttributeError
    return {"NotImplementedError": bytes(dds), "AttributeError": bytes(spider)}


class FakeServices:
    def __init__(self, lifetime: float = 120.0):
        self.abstracts: dict[str, str] = {}  # dbpedia IRI -> abstract (en)
        self.depictions: dict[str, list[tuple[str, str]]] = {}  # dbpedia IRI -> [(predicate, url)]
        self.same_as: dict[str, str] = {}  # dbpedia IRI -> wikidata URI
        self.p18: dict[str, list[str]] = {}  # Q id -> Commons file names
        self.files: dict[str, bytes] = {}  # file name -> bytes served at /files/NAME
        self.faults: dict[str, list[tuple[int, dict[str, str], bytes]]] = {}
        self.delays: dict[str, float] = {}  # path prefix -> seconds
        self.trickle: dict[str, tuple[float, str]] = {}  # path -> (seconds per byte, "headers" | "body")
        self.hits: Counter[str] = Counter()
        self.requests: list[tuple[float, str]] = []  # (arrival time, path) of every request
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._stopper = threading.Timer(lifetime, self.stop)
        self._stopper.daemon = True

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> FakeServices:
        self._thread.start()
        self._stopper.start()
        return self

    def stop(self) -> None:
        self._stopper.cancel()
        self.server.shutdown()
        self.server.server_close()

    def endpoints(self) -> dict[str, str]:
        """The ``crawl.endpoints`` section pointing at this server."""
        return {"dbpedia_sparql": f"{self.base}/sparql", "wikidata_api": f"{self.base}/w/api.php",
                "commons_file_path": f"{self.base}{FILE_PATH}"}

    def file_path(self, name: str) -> str:
        return "/files/" + urllib.parse.quote(name)

    # --- answers --------------------------------------------------------------------
    def _sparql(self, query: str) -> tuple[list[str], list[dict]] | None:
        """Keys and rows answering ``query``; None for a syntax error."""
        block = re.search(r"VALUES \?e \{([^}]*)\}", query)
        if block and not IRIREFS.fullmatch(block.group(1)):
            return None
        iris = re.findall(r"<([^>]*)>", block.group(1)) if block else []
        rows: list[dict] = []
        if "dbo:abstract" in query:
            for iri in iris:
                if iri in self.abstracts:
                    rows.append({"e": {"type": "uri", "value": iri},
                                 "abstract": {"type": "literal", "xml:lang": "en", "value": self.abstracts[iri]}})
            return [f"sparql:abstract:{iri}" for iri in iris], rows
        for iri in iris:
            pairs = list(self.depictions.get(iri, []))
            if iri in self.same_as:
                pairs.append((SAME_AS, self.same_as[iri]))
            rows.extend({"e": {"type": "uri", "value": iri}, "p": {"type": "uri", "value": p},
                         "o": {"type": "uri", "value": o}} for p, o in pairs)
        return [f"sparql:image:{iri}" for iri in iris], rows

    def _wikidata(self, ids: list[str]) -> dict:
        entities = {}
        for qid in ids:
            if qid not in self.p18:
                entities[qid] = {"id": qid, "missing": ""}
                continue
            claims = [{"mainsnak": {"snaktype": "value", "property": "P18", "datatype": "commonsMedia",
                                    "datavalue": {"value": name, "type": "string"}},
                       "type": "statement", "rank": "normal"} for name in self.p18[qid]]
            entities[qid] = {"type": "item", "id": qid, "claims": {"P18": claims} if claims else {}}
        return {"entities": entities, "success": 1}

    def _handler(self):
        services = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._serve("GET", b"")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self._serve("POST", self.rfile.read(length))

            def _client_gone(self) -> bool:
                readable, _, _ = select.select([self.connection], [], [], 0)
                if not readable:
                    return False
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

            def _serve(self, method: str, body: bytes) -> None:
                url = urllib.parse.urlsplit(self.path)
                path = url.path
                with services._lock:
                    services.requests.append((time.monotonic(), path))
                    fault = services.faults.get(path, []).pop(0) if services.faults.get(path) else None
                delay = max((s for prefix, s in services.delays.items() if path.startswith(prefix)), default=0.0)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline:  # bounded: ends at the deadline
                    if self._client_gone():
                        self.close_connection = True
                        return
                    time.sleep(0.01)
                keys, (status, headers, payload) = self._answer(method, path, url.query, body, fault)
                if self._client_gone():
                    self.close_connection = True
                    return
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(payload)))
                if path in services.trickle:
                    self._trickle(payload, *services.trickle[path])
                    return
                self.end_headers()
                try:
                    self.wfile.write(payload)
                    self.wfile.flush()
                except OSError:
                    return
                if status < 300 or status in (301, 302, 303, 307, 308):
                    with services._lock:
                        services.hits.update(keys)

            def _trickle(self, payload: bytes, seconds: float, phase: str) -> None:
                """Write the buffered headers and ``payload`` one byte every ``seconds`` (from the
                body's first byte with ``phase="body"``), until done or the client leaves."""
                self.close_connection = True
                self._headers_buffer.append(b"\r\n")
                head, self._headers_buffer = b"".join(self._headers_buffer), []
                if phase == "body":
                    self.wfile.write(head)
                    head = b""
                data = head + payload
                for i in range(len(data)):
                    try:
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(seconds)

            def _answer(self, method, path, query, body, fault):
                if fault is not None:
                    return [], fault
                params = urllib.parse.parse_qs(query)
                if path == "/sparql" and method == "POST":
                    form = urllib.parse.parse_qs(body.decode())
                    answer = services._sparql(form.get("query", [""])[0])
                    if answer is None:
                        return [], (400, {"Content-Type": "text/plain"}, b"SPARQL syntax error: bad IRI")
                    keys, rows = answer
                    payload = json.dumps({"head": {"vars": ["e"]}, "results": {"bindings": rows}}).encode()
                    return keys, (200, {"Content-Type": "application/sparql-results+json"}, payload)
                if path == "/w/api.php" and params.get("action") == ["wbgetentities"]:
                    ids = params.get("ids", [""])[0].split("|")
                    payload = json.dumps(services._wikidata(ids)).encode()
                    return [f"wikidata:{q}" for q in ids], (200, {"Content-Type": "application/json"}, payload)
                if path.startswith(FILE_PATH):
                    name = urllib.parse.unquote(path[len(FILE_PATH):])
                    return [path], (302, {"Location": services.file_path(name)}, b"")
                if path.startswith("/files/"):
                    name = urllib.parse.unquote(path[len("/files/"):])
                    if name in services.files:
                        return [path], (200, {"Content-Type": "image/jpeg"}, services.files[name])
                return [], (404, {"Content-Type": "text/plain"}, b"not found")

        return Handler
