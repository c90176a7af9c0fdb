"""A local PLC directory, PDS and relay (listRepos) on one aiohttp server at 127.0.0.1, for backfill tests.

``FakeNetwork`` serves repo CARs given by the test (the real exports in the shared fixtures) from
``com.atproto.sync.getRepo``, DID documents from ``GET /{did}`` as a PLC directory does, the did:web
document of its own host from ``/.well-known/did.json``, and a paged ``com.atproto.sync.listRepos``.

The DID documents are built here and point the ``#atproto_pds`` service at this server; they are
test data, not real documents. Responses can be scripted per DID (``script_get_repo``) to inject
XRPC errors, 429s and server errors, and a download can be held (``hold``) to interrupt a job.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import libipld
from aiohttp import web

from indexer.car import CarStream

HOST = "127.0.0.1"
CHUNK = 4096  # bytes per write, so that clients really receive a CAR in pieces


@dataclass
class ScriptedResponse:
    """One response getRepo sends instead of the repo: an XRPC error or a bare status."""

    status: int
    error: str | None = None
    message: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeNetwork:
    """PLC directory + PDS + relay listRepos on 127.0.0.1; start with ``async with``."""

    list_page_size: int = 2
    repos: dict[str, bytes] = field(default_factory=dict)  # did -> CAR bytes
    revs: dict[str, str] = field(default_factory=dict)
    documents: dict[str, dict] = field(default_factory=dict)  # did -> DID document (PLC)
    web_document: dict | None = None  # served at /.well-known/did.json
    listed: dict[str, dict] = field(default_factory=dict)  # did -> extra listRepos entry fields
    scripts: dict[str, list[ScriptedResponse]] = field(default_factory=lambda: defaultdict(list))
    holds: dict[str, asyncio.Event] = field(default_factory=dict)
    plc_status: int | None = None  # when set, the PLC directory returns this status for every request
    list_failures_after: int | None = None  # listRepos pages served before every later page fails
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    port: int | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def web_did(self) -> str:
        """The did:web naming this server (port percent-encoded, as did:web requires)."""
        return f"did:web:{quote(f'{HOST}:{self.port}', safe='')}"

    async def __aenter__(self) -> FakeNetwork:
        app = web.Application()
        app.router.add_get("/xrpc/com.atproto.sync.getRepo", self._get_repo)
        app.router.add_get("/xrpc/com.atproto.sync.listRepos", self._list_repos)
        app.router.add_get("/.well-known/did.json", self._well_known)
        app.router.add_get("/{did:did:plc:[a-z2-7]+}", self._plc)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc_info) -> None:
        for event in self.holds.values():
            event.set()
        await self._runner.cleanup()

    def add_repo(self, car_path: Path | bytes, *, did: str | None = None, publish: bool = True) -> str:
        """Serve a repo export; return its DID (read from the commit unless given).

        ``publish`` False serves the repo but gives its DID no PLC document.
        """
        data = car_path if isinstance(car_path, bytes) else Path(car_path).read_bytes()
        stream = CarStream(data)
        root = stream.roots[0]
        commit = next(libipld.decode_dag_cbor(block) for cid, block in stream if cid == root)
        did = did or commit["did"]
        self.repos[did] = data
        self.revs[did] = commit.get("rev")
        if publish:
            self.documents[did] = self.document_for(did)
        return did

    def document_for(self, did: str, *, handle: str | None = None) -> dict:
        """Build a DID document whose PDS is this server."""
        return {
            "id": did,
            "alsoKnownAs": [f"at://{handle or 'test-' + did.rsplit(':', 1)[1][:8] + '.example'}"],
            "verificationMethod": [{"id": f"{did}#atproto", "type": "Multikey", "controller": did,
                                    "publicKeyMultibase": "zQ3shTestKeyNotReal"}],
            "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": self.url}],
        }

    def script_get_repo(self, did: str, *responses: ScriptedResponse) -> None:
        """Return ``responses`` to the next getRepo calls for ``did``, in order, then serve the repo."""
        self.scripts[did].extend(responses)

    def hold(self, did: str) -> asyncio.Event:
        """Make getRepo for ``did`` wait before sending the body until the returned event is set."""
        event = self.holds[did] = asyncio.Event()
        return event

    def calls(self, path: str, did: str | None = None) -> int:
        """Return how many requests reached ``path`` (for ``did`` when given)."""
        return sum(1 for seen, query in self.requests if seen == path and (did is None or query.get("did") == did))

    async def _plc(self, request: web.Request) -> web.Response:
        did = request.match_info["did"]
        self.requests.append((request.path, {}))
        if self.plc_status is not None:
            return web.json_response({"message": "scripted failure"}, status=self.plc_status)
        document = self.documents.get(did)
        if document is None:
            return web.json_response({"message": f"DID not registered: {did}"}, status=404)
        return web.json_response(document)

    async def _well_known(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, {}))
        if self.web_document is None:
            return web.Response(status=404)
        return web.json_response(self.web_document)

    async def _get_repo(self, request: web.Request) -> web.StreamResponse:
        did = request.query.get("did", "")
        self.requests.append((request.path, dict(request.query)))
        script = self.scripts.get(did)
        if script:
            scripted = script.pop(0)
            body = None if scripted.error is None else {"error": scripted.error, "message": scripted.message}
            if body is None:
                return web.Response(status=scripted.status, text="scripted failure", headers=scripted.headers)
            return web.json_response(body, status=scripted.status, headers=scripted.headers)
        data = self.repos.get(did)
        if data is None:
            return web.json_response({"error": "RepoNotFound", "message": f"Could not find repo for DID: {did}"},
                                     status=400)
        response = web.StreamResponse(headers={"Content-Type": "application/vnd.ipld.car"})
        await response.prepare(request)
        held = self.holds.get(did)
        await response.write(data[:CHUNK])
        if held is not None:
            await held.wait()
        for start in range(CHUNK, len(data), CHUNK):
            await response.write(data[start:start + CHUNK])
        await response.write_eof()
        return response

    async def _list_repos(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.query)))
        pages_served = self.calls(request.path) - 1
        if self.list_failures_after is not None and pages_served >= self.list_failures_after:
            return web.json_response({"error": "InternalServerError", "message": "scripted failure"}, status=500)
        cursor = request.query.get("cursor")
        dids = sorted(set(self.repos) | set(self.listed))
        after = [did for did in dids if cursor is None or did > cursor]
        page = after[: self.list_page_size]
        repos = []
        for did in page:
            entry = {"did": did, "head": "bafyreigheadnotchecked", "rev": self.revs.get(did) or "2222222222222",
                     "active": True}
            entry.update(self.listed.get(did, {}))
            repos.append(entry)
        body: dict = {"repos": repos}
        if len(after) > len(page):
            body["cursor"] = page[-1]
        return web.Response(text=json.dumps(body), content_type="application/json")
