"""DID resolution against a local PLC directory and did:web host, with the did_documents cache."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from indexer.resolve import DidDocument, DidResolver, ResolveFailure, parse_document
from fake_network import FakeNetwork

PLC_DID = "did:plc:53iucmf5ldftgqyf2ac7hmhd"
UNKNOWN_DID = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


async def test_plc_did_resolves_pds_and_handle():
    async with FakeNetwork() as network:
        network.documents[PLC_DID] = network.document_for(PLC_DID, handle="alice.example")
        async with DidResolver(plc_url=network.url) as resolver:
            result = await resolver.resolve(PLC_DID)
    assert isinstance(result, DidDocument)
    assert result.pds_endpoint == network.url
    assert result.handle == "alice.example"
    assert result.signing_key == "zQ3shTestKeyNotReal"


async def test_web_did_resolves_over_local_http():
    async with FakeNetwork() as network:
        network.web_document = network.document_for(network.web_did)
        async with DidResolver(plc_url=network.url, allow_local_http=True) as resolver:
            result = await resolver.resolve(network.web_did)
    assert isinstance(result, DidDocument)
    assert result.pds_endpoint == network.url


def test_web_did_uses_https_by_default():
    resolver = DidResolver()
    assert resolver.document_url("did:web:127.0.0.1%3A8080") == "https://127.0.0.1:8080/.well-known/did.json"


def test_web_did_with_path_rejected():
    result = DidResolver().document_url("did:web:example.com:user:alice")
    assert isinstance(result, ResolveFailure)
    assert result.final


def test_malformed_did_rejected():
    result = DidResolver().document_url("did:plc:TOO-SHORT")
    assert isinstance(result, ResolveFailure)
    assert "did:plc" in result.error


async def test_unknown_did_is_final_failure():
    async with FakeNetwork() as network:
        async with DidResolver(plc_url=network.url) as resolver:
            result = await resolver.resolve(UNKNOWN_DID)
    assert isinstance(result, ResolveFailure)
    assert result.final
    assert "404" in result.error


def test_document_for_other_did_rejected():
    result = parse_document(PLC_DID, {"id": UNKNOWN_DID, "service": []})
    assert isinstance(result, ResolveFailure)
    assert UNKNOWN_DID in result.error


def test_document_with_full_service_id_parsed():
    document = {"id": PLC_DID, "service": [{"id": f"{PLC_DID}#atproto_pds", "type": "AtprotoPersonalDataServer",
                                            "serviceEndpoint": "https://pds.example"}]}
    result = parse_document(PLC_DID, document)
    assert result.pds_endpoint == "https://pds.example"
    assert result.handle is None


async def test_repeated_resolve_served_from_memory():
    async with FakeNetwork() as network:
        network.documents[PLC_DID] = network.document_for(PLC_DID)
        async with DidResolver(plc_url=network.url) as resolver:
            await resolver.resolve(PLC_DID)
            await resolver.resolve(PLC_DID)
    assert network.calls(f"/{PLC_DID}") == 1


async def test_database_cache_survives_resolver(database_url):
    async with FakeNetwork() as network:
        network.documents[PLC_DID] = network.document_for(PLC_DID)
        async with DidResolver(plc_url=network.url, database_url=database_url) as resolver:
            await resolver.resolve(PLC_DID)
        async with DidResolver(plc_url=network.url, database_url=database_url) as resolver:
            again = await resolver.resolve(PLC_DID)
    assert isinstance(again, DidDocument)
    assert network.calls(f"/{PLC_DID}") == 1
    with psycopg.connect(_libpq(database_url)) as connection:
        row = connection.execute("SELECT pds_endpoint, error FROM did_documents WHERE did = %s", (PLC_DID,)).fetchone()
    assert row == (network.url, None)


def _record_call_sizes(resolver: DidResolver, name: str) -> list[int]:
    """Wrap the resolver's coroutine method ``name`` and return the list that gets each call's argument size."""
    sizes: list[int] = []
    method = getattr(resolver, name)

    async def recorded(argument):
        sizes.append(len(argument))
        return await method(argument)

    setattr(resolver, name, recorded)
    return sizes


async def test_concurrent_cache_lookups_share_one_query(database_url):
    dids = [f"did:plc:{chr(ord('a') + index) * 24}" for index in range(12)]
    async with FakeNetwork() as network:
        for did in dids:
            network.documents[did] = network.document_for(did)
        async with DidResolver(plc_url=network.url, database_url=database_url) as resolver:
            for did in dids:
                await resolver.resolve(did)
        async with DidResolver(plc_url=network.url, database_url=database_url) as resolver:
            queries = _record_call_sizes(resolver, "_query_rows")
            results = await asyncio.gather(*(resolver.resolve(did) for did in dids))
    assert [result.did for result in results] == dids
    assert queries == [len(dids)]
    assert all(network.calls(f"/{did}") == 1 for did in dids)


async def test_concurrent_cache_writes_share_rounds(database_url):
    dids = [f"did:plc:{chr(ord('a') + index) * 24}" for index in range(12)]
    async with FakeNetwork() as network:
        for did in dids[:-1]:
            network.documents[did] = network.document_for(did)
        async with DidResolver(plc_url=network.url, database_url=database_url) as resolver:
            rounds = _record_call_sizes(resolver, "_write_rows")
            results = await asyncio.gather(*(resolver.resolve(did) for did in dids))
    with psycopg.connect(_libpq(database_url)) as connection:
        stored = connection.execute("SELECT did, error IS NULL FROM did_documents ORDER BY did").fetchall()
    assert sum(rounds) == len(dids)
    assert len(rounds) < len(dids)
    assert isinstance(results[-1], ResolveFailure)
    assert stored == [(did, did != dids[-1]) for did in dids]


async def test_close_before_lookup_ran_releases_waiter(database_url):
    # Regression: aclose() cancelled the shared lookup task before its first step, so the waiting
    # resolve() hung, and every later lookup on the resolver too.
    async with FakeNetwork() as network:
        network.documents[PLC_DID] = network.document_for(PLC_DID)
        resolver = DidResolver(plc_url=network.url, database_url=database_url)
        waiter = asyncio.create_task(resolver.resolve(PLC_DID))
        await asyncio.sleep(0)
        await resolver.aclose()
        done, _ = await asyncio.wait([waiter], timeout=3)
        again = await asyncio.wait_for(resolver.resolve(PLC_DID), timeout=5)
        await resolver.aclose()
    assert done == {waiter}
    assert isinstance(again, DidDocument)


async def test_stale_document_used_when_directory_fails(database_url):
    async with FakeNetwork() as network:
        network.documents[PLC_DID] = network.document_for(PLC_DID)
        async with DidResolver(plc_url=network.url, database_url=database_url) as resolver:
            await resolver.resolve(PLC_DID)
        with psycopg.connect(_libpq(database_url)) as connection:
            connection.execute("UPDATE did_documents SET checked_at = now() - interval '2 days'")
        await network.__aexit__(None, None, None)  # the directory is now unreachable
        async with DidResolver(plc_url=network.url, database_url=database_url, timeout=2.0) as resolver:
            result = await resolver.resolve(PLC_DID)
    assert isinstance(result, DidDocument)


async def test_final_failure_cached_in_database(database_url):
    async with FakeNetwork() as network:
        async with DidResolver(plc_url=network.url, database_url=database_url) as resolver:
            await resolver.resolve(UNKNOWN_DID)
        async with DidResolver(plc_url=network.url, database_url=database_url) as resolver:
            result = await resolver.resolve(UNKNOWN_DID)
    assert isinstance(result, ResolveFailure)
    assert network.calls(f"/{UNKNOWN_DID}") == 1


async def test_cached_failure_ignored_after_plc_url_change(database_url):
    # Regression (newcomer walkthrough): a 404 from a mistyped --plc-url was reused for an hour
    # after the URL was corrected, and the error still named the old directory.
    async with FakeNetwork() as wrong, FakeNetwork() as right:
        right.documents[PLC_DID] = right.document_for(PLC_DID)
        async with DidResolver(plc_url=wrong.url, database_url=database_url) as resolver:
            first = await resolver.resolve(PLC_DID)
        async with DidResolver(plc_url=right.url, database_url=database_url) as resolver:
            second = await resolver.resolve(PLC_DID)
    assert isinstance(first, ResolveFailure)
    assert isinstance(second, DidDocument)
    assert right.calls(f"/{PLC_DID}") == 1


async def test_cached_document_refetched_after_plc_url_change(database_url):
    async with FakeNetwork() as first, FakeNetwork() as second:
        first.documents[PLC_DID] = first.document_for(PLC_DID, handle="old.example")
        second.documents[PLC_DID] = second.document_for(PLC_DID, handle="new.example")
        async with DidResolver(plc_url=first.url, database_url=database_url) as resolver:
            await resolver.resolve(PLC_DID)
        async with DidResolver(plc_url=second.url, database_url=database_url) as resolver:
            result = await resolver.resolve(PLC_DID)
        async with DidResolver(plc_url=second.url, database_url=database_url) as resolver:
            again = await resolver.resolve(PLC_DID)
    assert result.handle == "new.example"
    assert again.handle == "new.example"
    assert second.calls(f"/{PLC_DID}") == 1


@pytest.mark.parametrize("status", [500, 429])
async def test_server_error_is_transient_failure(status):
    async with FakeNetwork() as network:
        network.documents[PLC_DID] = network.document_for(PLC_DID)
        network.plc_status = status
        async with DidResolver(plc_url=network.url) as resolver:
            result = await resolver.resolve(PLC_DID)
    assert isinstance(result, ResolveFailure)
    assert not result.final
