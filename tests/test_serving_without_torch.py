"""The CPU serving path (ONNX Runtime encoder + FAISS search) runs without torch and onnx: the
serving image leaves both out. Proven in a fresh interpreter where importing either fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SERVE = """
import json, sys
sys.modules["torch"] = None  # `import torch` (and torch.*) now raises ImportError
sys.modules["onnx"] = None
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings

app = create_app(Settings(artifacts=sys.argv[1], redis_url=None, reload_on_sighup=False,
                          admin_token="t"))
with TestClient(app) as client:
    ready = client.get("/readyz").status_code
    markets = client.get("/markets").json()["markets"]
    market = markets[0]["market"]
    popular = client.post(f"/markets/{market}/recommend", json={"k": 3}).json()
    items = [item["item_id"] for item in popular["items"][:2]]
    answer = client.post(f"/markets/{market}/recommend", json={"items": items, "k": 5}).json()
    reload = client.post("/admin/reload", headers={"Authorization": "Bearer t"}).status_code
print(json.dumps({"ready": ready, "markets": markets, "popular": popular, "answer": answer,
                  "reload": reload, "torch": sys.modules.get("torch") is not None}))
"""


def test_cpu_serving_path_needs_no_torch(service_artifacts: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SERVE, str(service_artifacts)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ready"] == 200 and result["reload"] == 200 and not result["torch"]
    assert {m["encoder"] for m in result["markets"]} == {"onnx"}
    assert {m["search"] for m in result["markets"]} == {"faiss"}
    assert result["popular"]["fallback"] == "popular"
    answer = result["answer"]
    assert answer["fallback"] is None and answer["unknown_items"] == []
    assert len(answer["items"]) == 5
    seen = {item["item_id"] for item in result["popular"]["items"][:2]}
    assert not seen & {item["item_id"] for item in answer["items"]}  # exclude_seen by default
    scores = [item["score"] for item in answer["items"]]
    assert scores == sorted(scores, reverse=True)
