"""Hostile input against the real app: huge bodies, huge k, thousands of items, deep or
non-UTF-8 JSON, path tricks. Each must be a clear 4xx, memory stays bounded, and the service
answers normal requests the same way afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_api_recommend import popular

MAX_BODY = 65536


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


JSON = {"Content-Type": "application/json"}

# (name, method, path, raw body or None, headers, expected status, expected error code)
HOSTILE: list[tuple[str, str, str, bytes | None, dict[str, str], int, str]] = [
    ("1 MiB body", "POST", "/markets/aa/recommend",
     b'{"items": ["' + b"x" * (1 << 20) + b'"]}', JSON, 413, "body_too_large"),
    ("k = 10**12", "POST", "/markets/aa/recommend", b'{"k": 1000000000000}', JSON, 422,
     "invalid_request"),
    ("k = 2**80", "POST", "/markets/aa/recommend", b'{"k": 1208925819614629174706176}', JSON,
     422, "invalid_request"),
    ("k = 1e308", "POST", "/markets/aa/recommend", b'{"k": 1e308}', JSON, 422,
     "invalid_request"),
    ("k = NaN", "POST", "/markets/aa/recommend", b'{"k": NaN}', JSON, 422, "invalid_request"),
    ("k = -1", "POST", "/markets/aa/recommend", b'{"k": -1}', JSON, 422, "invalid_request"),
    ("5000 items", "POST", "/markets/aa/recommend",
     json.dumps({"items": [f"i{n}" for n in range(5000)]}).encode(), JSON, 422,
     "invalid_request"),
    ("5000 candidates", "POST", "/markets/aa/recommend",
     json.dumps({"candidates": [f"i{n}" for n in range(5000)]}).encode(), JSON, 422,
     "invalid_request"),
    ("5000 events", "POST", "/markets/aa/sessions/s1/events",
     json.dumps({"items": [f"i{n}" for n in range(5000)]}).encode(), JSON, 422,
     "invalid_request"),
    ("9000 wrong-typed items", "POST", "/markets/aa/recommend",
     json.dumps({"items": list(range(9000))}).encode(), JSON, 422, "invalid_request"),
    ("item id of 10 KB", "POST", "/markets/aa/recommend",
     json.dumps({"items": ["x" * 10_000]}).encode(), JSON, 422, "invalid_request"),
    ("nested 30000 deep", "POST", "/markets/aa/recommend", b"[" * 30000 + b"]" * 30000, JSON,
     400, "invalid_request"),
    ("nested objects 5000 deep", "POST", "/markets/aa/recommend",
     b'{"items": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}", JSON, 400,
     "invalid_request"),
    ("nested objects 500 deep", "POST", "/markets/aa/recommend",
     b'{"items": ' + b'{"a": ' * 500 + b"1" + b"}" * 500 + b"}", JSON, 422,
     "invalid_request"),
    ("not UTF-8, JSON type", "POST", "/markets/aa/recommend", b'{"items": ["\xff\xfe"]}', JSON,
     400, "invalid_request"),
    ("not UTF-8, no type", "POST", "/markets/aa/recommend", b"\xff\xfe\x00", {}, 422,
     "invalid_request"),
    ("truncated JSON", "POST", "/markets/aa/recommend", b'{"items": ["a", ', JSON, 422,
     "invalid_request"),
    ("JSON array body", "POST", "/markets/aa/sessions/s1/events", b'["a"]', JSON, 422,
     "invalid_request"),
    ("exclude_seen = 0", "POST", "/markets/aa/recommend", b'{"exclude_seen": 0}', JSON, 422,
     "invalid_request"),
    ("unknown field", "POST", "/markets/aa/recommend", b'{"itemz": []}', JSON, 422,
     "invalid_request"),
    ("bad Content-Length", "POST", "/markets/aa/recommend", b"{}",
     {**JSON, "Content-Length": "-5"}, 400, "invalid_request"),
    ("market ../..", "POST", "/markets/..%2F..%2Fetc%2Fpasswd/recommend", b"{}", JSON, 404,
     "not_found"),
    ("market with NUL", "POST", "/markets/aa%00/recommend", b"{}", JSON, 422,
     "invalid_request"),
    ("market of 5000 chars", "POST", "/markets/" + "a" * 5000 + "/recommend", b"{}", JSON, 422,
     "invalid_request"),
    ("market with colon", "POST", "/markets/aa:x/sessions/s/events", b'{"items": ["a"]}', JSON,
     422, "invalid_request"),
    ("unicode market", "POST", "/markets/%C3%A9/recommend", b"{}", JSON, 422,
     "invalid_request"),
    ("unknown market", "POST", "/markets/zz/recommend", b"{}", JSON, 404, "unknown_market"),
    ("session ../../x", "GET", "/markets/aa/sessions/..%2F..%2Fx", None, {}, 404, "not_found"),
    ("session with space", "GET", "/markets/aa/sessions/a%20b", None, {}, 422,
     "invalid_request"),
    ("session with newline", "POST", "/markets/aa/sessions/a%0Ab/events", b'{"items": ["a"]}',
     JSON, 422, "invalid_request"),
    ("session of 5000 chars", "GET", "/markets/aa/sessions/" + "s" * 5000, None, {}, 422,
     "invalid_request"),
    ("session_id in body with *", "POST", "/markets/aa/recommend",
     b'{"session_id": "xmr:*", "items": []}', JSON, 422, "invalid_request"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_request_gets_a_clear_4xx(make_service_client, case) -> None:
    name, method, path, body, headers, status, code = case
    with make_service_client(max_k=100, max_body_bytes=MAX_BODY) as client:
        r = client.request(method, path, content=body, headers=headers)
    assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
    payload = r.json()
    assert payload["error"] == code and payload["message"], payload
    assert "error parsing the body" not in payload["message"]  # says what was wrong
    assert len(r.content) < 8192, f"{name}: a {len(r.content)}-byte error answer"


def test_service_unaffected_and_memory_bounded_after_abuse(make_service_client,
                                                           service_artifacts: Path) -> None:
    """All hostile requests, 20 rounds: same answer to a normal request, RSS < +100 MiB."""
    session = {"items": popular(service_artifacts, "aa")[:3], "k": 5}
    with make_service_client(max_k=100, max_body_bytes=MAX_BODY) as client:
        before = client.post("/markets/aa/recommend", json=session).json()
        for _, method, path, body, headers, _, _ in HOSTILE:  # warm every path once
            client.request(method, path, content=body, headers=headers)
        rss_start = rss_mib()
        statuses = set()
        for _ in range(20):
            for _, method, path, body, headers, _, _ in HOSTILE:
                statuses.add(client.request(method, path, content=body,
                                            headers=headers).status_code)
        rss_end = rss_mib()
        after = client.post("/markets/aa/recommend", json=session).json()
        ready = client.get("/readyz").status_code
    print(f"abuse: {20 * len(HOSTILE)} hostile requests, RSS {rss_start:.0f} -> "
          f"{rss_end:.0f} MiB")
    assert max(statuses) < 500
    assert ready == 200
    assert [i["item_id"] for i in after["items"]] == [i["item_id"] for i in before["items"]]
    assert rss_end - rss_start < 100


def test_wrong_method_names_every_allowed_method(make_service_client) -> None:
    with make_service_client() as client:
        r = client.options("/markets/aa/sessions/s1")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    assert r.headers["allow"] == "DELETE, GET"
