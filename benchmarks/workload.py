"""The load benchmark's workload: recommend request bodies cut from real user sequences.

Each request picks a market uniformly, a session length uniformly in 1..50 (capped by the
market's longest user), and a window of that length from a user who has that many items. A
share of requests names a `session_id` and sends only the user's next 1-5 items, so the server
appends them to its Redis session (capped at the server's session length) before encoding.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from training.data import read_dataset

ITEMS = "items"  # the whole session is in the body
SESSION = "session"  # a session_id plus the next few items; the server reads the rest from Redis


@dataclass(frozen=True)
class Request:
    kind: str  # ITEMS or SESSION
    market: str
    body: str  # JSON body of POST /markets/{market}/recommend (and of the market no-op)
    n_items: int  # items in the body


@dataclass(frozen=True)
class WorkloadSpec:
    n_requests: int = 4000
    max_items: int = 50
    session_share: float = 0.2
    n_sessions: int = 500  # distinct session ids the SESSION requests cycle through
    k: int = 10
    seed: int = 0


def _window(rng: random.Random, sequence: list[str], length: int) -> list[str]:
    start = rng.randrange(len(sequence) - length + 1)
    return sequence[start : start + length]


def build_requests(data: Path, spec: WorkloadSpec) -> list[Request]:
    """Deterministic (given the data and the seed) request list in random order."""
    rng = random.Random(spec.seed)
    dataset = read_dataset(data)
    # users of each market sorted by id, so the draw does not depend on dict order
    sequences = {
        market: [log.sequences[user] for user in sorted(log.sequences)]
        for market, log in dataset.markets.items()
    }
    markets = sorted(sequences)
    # SESSION requests: each session id follows one real user, sending their items in order.
    sessions: list[tuple[str, str, list[str]]] = []
    for n in range(spec.n_sessions):
        market = rng.choice(markets)
        sessions.append((market, f"bench-{market}-{n}", rng.choice(sequences[market])))
    cursor = [0] * len(sessions)

    requests: list[Request] = []
    for n in range(spec.n_requests):
        if rng.random() < spec.session_share:
            s = n % len(sessions)
            market, session_id, sequence = sessions[s]
            step = rng.randint(1, 5)
            items = [sequence[(cursor[s] + i) % len(sequence)] for i in range(step)]
            cursor[s] += step
            body = {"items": items, "session_id": session_id, "k": spec.k}
            requests.append(Request(SESSION, market, json.dumps(body), len(items)))
            continue
        market = rng.choice(markets)
        longest = max(len(seq) for seq in sequences[market])
        length = min(rng.randint(1, spec.max_items), longest)
        users = [seq for seq in sequences[market] if len(seq) >= length]
        items = _window(rng, rng.choice(users), length)
        body = {"items": items, "k": spec.k}
        requests.append(Request(ITEMS, market, json.dumps(body), len(items)))
    return requests


def write_requests(path: Path, requests: list[Request]) -> None:
    path.write_text(json.dumps([asdict(r) for r in requests]), encoding="utf-8")


def read_requests(path: Path) -> list[Request]:
    return [Request(**r) for r in json.loads(path.read_text(encoding="utf-8"))]


def describe(requests: list[Request]) -> dict[str, object]:
    """The mix, for the report: counts per kind and market, body lengths."""
    items = [r.n_items for r in requests if r.kind == ITEMS]
    by_market: dict[str, int] = {}
    for r in requests:
        by_market[r.market] = by_market.get(r.market, 0) + 1
    return {
        "n_requests": len(requests),
        "n_items_requests": len(items),
        "n_session_requests": len(requests) - len(items),
        "items_per_items_request": {
            "min": min(items, default=0), "mean": round(sum(items) / max(1, len(items)), 1),
            "max": max(items, default=0),
        },
        "requests_per_market": dict(sorted(by_market.items())),
    }
