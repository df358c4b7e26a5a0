"""The local stack for real: build the images, `docker compose up --wait`, and use the API
through its published port as a storefront would. `make stack-test` runs it; so does .ci/run.

    python deploy/stack/stack_test.py                        # synthetic markets, classic builder
    python deploy/stack/stack_test.py --data ../shared/data/xmarket --builders classic,buildkit

Steps: a Docker engine (deploy/stack/engine.sh: installed and started when none answers), base
images (deploy/stack/base-images.sh: stand-ins where no registry answers), the `serve` and
`train` images, then with Compose:
  1. bad input: a broken data file fails the artifacts job, its log names file and line, and
     the API never starts;
  2. `up --wait`: /readyz 200, a recommendation of real items, GET /markets;
  3. session events land in the Redis container and survive `docker compose restart redis`;
  4. `XMR_RETRAIN=1 docker compose run --rm artifacts`, then `kill -s HUP api`, under a steady
     client load: the new model versions are served, no request fails, no response mixes sets;
  5. the API's processes run as uid 10001, not root; cold start of the API to ready;
  6. `down -v` leaves no container, volume or network of the project.
Whatever happens, the stack is taken down and a dockerd this script started is stopped.
Exit 0 with a loud SKIPPED banner only where no engine can be installed or started.
Numbers go to --report (JSON) and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "deploy" / "stack"
PROJECT = "xmr-stacktest"
SERVE_IMAGE, TRAIN_IMAGE = "xmr:cpu", "xmr:cpu-train"
TORCH_VERSION = "2.13.0"
SKIP_EXIT = 3  # engine.sh: no engine can be had here


class StackError(RuntimeError):
    """A check of the stack failed; the message says which and what was seen."""


@dataclass
class Report:
    data: str
    numbers: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)

    def passed(self, check: str) -> None:
        self.checks.append(check)
        print(f"stack-test: PASS {check}", flush=True)


def log(message: str) -> None:
    print(f"stack-test: {message}", flush=True)


def run(args: list[str], env: dict[str, str] | None = None, check: bool = True,
        timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=REPO, env={**os.environ, **(env or {})}, text=True,
                          capture_output=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise StackError(f"{' '.join(args)} exited {done.returncode}:\n"
                         f"{(done.stdout + done.stderr)[-4000:]}")
    return done


def timed(args: list[str], env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    run(args, env)
    return round(time.monotonic() - started, 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- engine, base images, images ----------------------------------------------------------

@contextmanager
def engine() -> Iterator[None]:
    """A Docker engine for the block; stops the dockerd it started, even on failure."""
    done = run(["bash", str(STACK / "engine.sh"), "start"], check=False)
    sys.stderr.write(done.stderr)
    if done.returncode == SKIP_EXIT:
        banner = "STACK TEST SKIPPED: no Docker engine can be installed or started here"
        print(f"\n{'!' * len(banner)}\n{banner}\n{done.stderr.strip()}\n{'!' * len(banner)}\n",
              flush=True)
        raise SystemExit(0)
    if done.returncode != 0:
        raise StackError(f"engine.sh start exited {done.returncode}")
    started = done.stdout.split()[1] if done.stdout.startswith("started") else None
    try:
        yield
    finally:
        if started:
            run(["bash", str(STACK / "engine.sh"), "stop", started], check=False)


def base_images() -> dict[str, str]:
    done = run(["bash", str(STACK / "base-images.sh")])
    sys.stderr.write(done.stderr)
    return dict(line.split("=", 1) for line in done.stdout.split())


def torch_wheel() -> None:
    """Put the CPU torch wheel that pip finds on this host into the build context (the train
    image installs it instead of asking the PyTorch index, which may be out of reach)."""
    target = REPO / "deploy" / "docker" / "wheels"
    if list(target.glob(f"torch-{TORCH_VERSION}+cpu-*.whl")):
        return
    links = run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                check=False).stdout.split()
    for folder in links:
        for wheel in Path(folder.removeprefix("file://")).glob(f"torch-{TORCH_VERSION}+cpu-*.whl"):
            try:
                os.link(wheel, target / wheel.name)
            except OSError:
                shutil.copy2(wheel, target / wheel.name)
            log(f"torch wheel for the train image: {wheel}")
            return
    log("no local CPU torch wheel: the train image installs torch from the PyTorch CPU index")


def build(builder: str, python_image: str, report: Report) -> None:
    """Both targets with one builder; times and sizes into the report."""
    docker = "docker"
    env = {"DOCKER_BUILDKIT": "1" if builder == "buildkit" else "0"}
    if builder == "buildkit" and run(["docker", "buildx", "version"], check=False).returncode:
        # No buildx plugin: a CLI older than 23 builds with the engine's own BuildKit.
        docker = next((c for c in ("/usr/bin/docker", "docker") if shutil.which(c) and run(
            [c, "version", "--format", "{{.Client.Version}}"], check=False
        ).stdout.strip().split(".")[0] in {"18", "19", "20", "21", "22"}), "")
        if not docker:
            raise StackError("BuildKit needs the buildx plugin or a docker CLI older than 23")
    for target, tag in (("serve", SERVE_IMAGE), ("train", TRAIN_IMAGE)):
        seconds = timed([docker, "build", "--target", target, "--build-arg",
                         f"PYTHON_IMAGE={python_image}", "-t", tag, "."], env)
        report.numbers[f"build_{builder}_{target}_s"] = seconds
        log(f"built {tag} ({target}) with the {builder} builder in {seconds} s")
    for tag in (SERVE_IMAGE, TRAIN_IMAGE):
        size = int(run(["docker", "image", "inspect", "--format", "{{.Size}}", tag]).stdout)
        report.numbers[f"size_{tag}_MB"] = round(size / 1e6)
    torch_in_serve = run(["docker", "run", "--rm", "--entrypoint", "python", SERVE_IMAGE, "-c",
                          "import importlib.util as u; print(u.find_spec('torch') is not None)"])
    if torch_in_serve.stdout.strip() != "False":
        raise StackError(f"{SERVE_IMAGE} has torch installed")
    report.passed(f"images built with the {builder} builder; {SERVE_IMAGE} has no torch")


# --- the compose stack ----------------------------------------------------------------------

@dataclass
class Stack:
    env: dict[str, str]
    port: int

    def compose(self, *args: str, check: bool = True,
                extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run(["docker", "compose", "-p", PROJECT, "-f", "docker-compose.yml", *args],
                   {**self.env, **(extra or {})}, check=check)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)


def leftovers() -> list[str]:
    """Containers, volumes and networks of the test project still on the engine."""
    label = f"label=com.docker.compose.project={PROJECT}"
    found = []
    for kind in (["ps", "-aq"], ["volume", "ls", "-q"], ["network", "ls", "-q"]):
        found += run(["docker", *kind, "--filter", label]).stdout.split()
    return found


def versions(client: httpx.Client) -> dict[str, tuple[str, str]]:
    """market -> (model version, index version) of what the API serves."""
    markets = client.get("/markets").raise_for_status().json()["markets"]
    return {m["market"]: (m["model_version"], m["index_version"]) for m in markets}


def served_set(stack: Stack) -> dict[str, tuple[str, str]]:
    """market -> (model version, index version) of the current generation on the volume."""
    script = ("import json, pathlib; print(json.dumps({p.parent.name: json.loads(p.read_text()) "
              "for p in pathlib.Path('/var/lib/xmr/artifacts/markets').glob('*/index.json')}))")
    done = stack.compose("run", "--rm", "--no-deps", "--entrypoint", "python", "artifacts", "-c",
                         script)
    indexes = json.loads(done.stdout.strip().splitlines()[-1])
    return {m: (i["model_version"], i["version"]) for m, i in indexes.items()}


def check_bad_input(stack: Stack, data: Path, report: Report) -> None:
    """A broken data file: the job fails naming file and line, the API never starts."""
    with tempfile.TemporaryDirectory(prefix="xmr-bad-data-") as bad:
        for path in sorted(data.glob("*_5core.txt"))[:2]:
            shutil.copy(path, bad)
        broken = sorted(Path(bad).glob("*_5core.txt"))[-1]
        with broken.open("a", encoding="utf-8") as f:
            f.write("only two\n")
        line = sum(1 for _ in broken.open(encoding="utf-8"))
        os.chmod(bad, 0o755)
        up = stack.compose("up", "--wait", "--no-build", check=False, extra={"XMR_DATA": bad})
        logs = stack.compose("logs", "--no-color", "artifacts", check=False).stdout
        api = stack.compose("ps", "-a", "--format", "json", "api", check=False).stdout
        stack.down()
    expected = f"{broken.name}:{line}:"
    if up.returncode == 0 or expected not in logs or "nothing was published" not in logs:
        raise StackError(f"a broken {expected} was not reported (up exit {up.returncode}):\n"
                         f"{logs[-3000:]}")
    if '"running"' in api.lower():
        raise StackError(f"the API started on a failed artifacts job: {api}")
    report.passed(f"broken data file: `docker compose logs artifacts` names {expected}, "
                  "the API never started")


def check_serving(client: httpx.Client, report: Report) -> tuple[str, list[str]]:
    """/readyz, /markets, and a recommendation of real items; (market, session items)."""
    if client.get("/readyz").status_code != 200:
        raise StackError(f"/readyz: {client.get('/readyz').text}")
    markets = client.get("/markets").raise_for_status().json()["markets"]
    market = markets[0]["market"]
    popular = client.post(f"/markets/{market}/recommend", json={"k": 5}).raise_for_status().json()
    items = [item["item_id"] for item in popular["items"][:2]]
    answer = client.post(f"/markets/{market}/recommend",
                         json={"items": items, "k": 5}).raise_for_status().json()
    got = [item["item_id"] for item in answer["items"]]
    if answer["fallback"] is not None or len(got) != 5 or set(got) & set(items):
        raise StackError(f"recommendation for {items} in {market}: {answer}")
    report.passed(f"/readyz 200; {len(markets)} markets; POST /markets/{market}/recommend "
                  f"{items} -> {got}")
    return market, items


def check_sessions(stack: Stack, client: httpx.Client, market: str, items: list[str],
                   report: Report) -> None:
    """Events stored in the Redis container survive `docker compose restart redis` (AOF)."""
    session = f"stack-test-{os.getpid()}"
    path = f"/markets/{market}/sessions/{session}"
    client.post(f"{path}/events", json={"items": items}).raise_for_status()
    keys = stack.compose("exec", "-T", "redis", "redis-cli", "--scan").stdout.split()
    if not any(session in key for key in keys):
        raise StackError(f"session {session} not among the Redis container's keys: {keys}")
    stack.compose("restart", "redis")
    deadline = time.monotonic() + 60
    while True:
        response = client.get(path)
        if response.status_code == 200:
            break
        if time.monotonic() > deadline:
            raise StackError(f"GET {path} after the Redis restart: {response.status_code} "
                             f"{response.text}")
        time.sleep(0.5)
    stored = response.json()["items"]
    if stored != items:
        raise StackError(f"session after `restart redis`: {stored}, expected {items}")
    report.passed(f"session events in the Redis container survive `restart redis`: {stored}")


class Load:
    """A steady client: recommendations in a loop, every status and version pair recorded."""

    def __init__(self, url: str, market: str, items: list[str]) -> None:
        self.url, self.market, self.items = url, market, items
        self.results: list[tuple[int, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(f"/markets/{self.market}/recommend",
                                    json={"items": self.items, "k": 10})
                    body = r.json() if r.status_code == 200 else {}
                    self.results.append((r.status_code, body.get("model_version", ""),
                                         body.get("index_version", "")))
                except httpx.HTTPError as e:
                    self.results.append((0, type(e).__name__, ""))
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def check_reload(stack: Stack, client: httpx.Client, market: str, items: list[str],
                 report: Report) -> None:
    """Retrain into a new generation, SIGHUP the API: new versions, no failed request."""
    before = versions(client)
    with Load(stack.url, market, items) as load:
        started = time.monotonic()
        stack.compose("run", "--rm", "artifacts", extra={"XMR_RETRAIN": "1",
                                                         "XMR_TRAIN_SEED": "1"})
        retrain_s = time.monotonic() - started
        expected = served_set(stack)
        if expected == before:
            raise StackError("the retrain published the same versions")
        during = len(load.results)
        stack.compose("kill", "-s", "HUP", "api")
        hup = time.monotonic()
        while versions(client) != expected:
            if time.monotonic() - hup > 120:
                raise StackError(f"after SIGHUP still {versions(client)}, expected {expected}")
            time.sleep(0.2)
        reload_s = time.monotonic() - hup
        time.sleep(1)  # requests after the swap too
    failed = [r for r in load.results if r[0] != 200]
    pairs = {(m, i) for _, m, i in load.results}
    allowed = {before[market], expected[market]}
    if failed or not pairs <= allowed or expected[market] not in pairs:
        raise StackError(f"during the reload: {len(failed)} failed of {len(load.results)} "
                         f"(first {failed[:3]}); versions seen {pairs}, allowed {allowed}")
    report.numbers.update(reload_requests=len(load.results), reload_failed=len(failed),
                          reload_requests_while_training=during,
                          retrain_s=round(retrain_s, 1), hup_to_new_version_s=round(reload_s, 1))
    report.passed(f"retrain + SIGHUP: {len(load.results)} requests, 0 failed, versions "
                  f"{before[market][0]} -> {expected[market][0]} ({market}), new set served "
                  f"{reload_s:.1f} s after the signal")


def check_non_root(stack: Stack, report: Report) -> None:
    container = stack.compose("ps", "-q", "api").stdout.strip()
    top = run(["docker", "top", container, "-o", "uid,pid,args"]).stdout.splitlines()[1:]
    uids = {line.split()[0] for line in top}
    if uids != {"10001"}:
        raise StackError(f"API processes run as {uids}:\n" + "\n".join(top))
    report.passed(f"the API's {len(top)} processes run as uid 10001 (not root)")


def cold_start(stack: Stack, client: httpx.Client, report: Report, runs: int = 3) -> None:
    """From `docker start` of the stopped API container to /readyz 200 on the published port
    (models, indexes and Redis ready), `runs` times."""
    container = stack.compose("ps", "-q", "api").stdout.strip()
    seconds = []
    for _ in range(runs):
        run(["docker", "stop", container])
        started = time.monotonic()
        run(["docker", "start", container])
        while True:
            try:
                if client.get("/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > 180:
                raise StackError("the API was not ready 180 s after `docker start`")
            time.sleep(0.05)
        seconds.append(round(time.monotonic() - started, 2))
    report.numbers["api_cold_start_to_ready_s"] = seconds
    report.passed(f"cold start of the API container to /readyz 200: {seconds} s "
                  f"({runs} runs)")


def run_stack(data: Path, images: dict[str, str], report: Report) -> None:
    stack = Stack({"XMR_PYTHON_IMAGE": images["PYTHON_IMAGE"],
                   "XMR_REDIS_IMAGE": images["REDIS_IMAGE"], "XMR_IMAGE": SERVE_IMAGE,
                   "XMR_TRAIN_IMAGE": TRAIN_IMAGE, "XMR_DATA": str(data),
                   "XMR_PUBLISH_PORT": str(free_port()),
                   "XMR_IMPORT": tempfile.mkdtemp(prefix="xmr-no-import-")}, 0)
    stack.port = int(stack.env["XMR_PUBLISH_PORT"])
    stack.down()
    try:
        check_bad_input(stack, data, report)
        started = time.monotonic()
        stack.compose("up", "--wait", "--no-build")
        report.numbers["compose_up_wait_s"] = round(time.monotonic() - started, 1)
        report.passed(f"docker compose up --wait: {report.numbers['compose_up_wait_s']} s "
                      "(training + indexes + API ready)")
        with httpx.Client(base_url=stack.url, timeout=10) as client:
            market, items = check_serving(client, report)
            check_sessions(stack, client, market, items, report)
            check_non_root(stack, report)
            check_reload(stack, client, market, items, report)
            cold_start(stack, client, report)
    except BaseException:
        for service in ("artifacts", "api"):
            log(f"--- docker compose logs {service} (last lines)")
            print(stack.compose("logs", "--no-color", "--tail", "40", service,
                                check=False).stdout, flush=True)
        raise
    finally:
        stack.down()
    left = leftovers()
    if left:
        raise StackError(f"`docker compose down -v` left {left}")
    report.passed("`docker compose down -v` left no container, volume or network")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="<market>_5core.txt files (default: the synthetic markets)")
    parser.add_argument("--builders", default="classic",
                        help="comma list of classic, buildkit (each builds both images)")
    parser.add_argument("--report", type=Path, default=REPO / "out" / "stack" / "report.json")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xmr-stack-data-") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp)
            run([sys.executable, "-m", "service.cli", "synthetic", "--out", str(data)])
            os.chmod(data, 0o755)
        data = data.resolve()
        if not list(data.glob("*_5core.txt")):
            raise StackError(f"{data}: no <market>_5core.txt files")
        report = Report(str(args.data or "synthetic"))
        with engine():
            images = base_images()
            report.numbers.update(images)
            torch_wheel()
            for builder in args.builders.split(","):
                build(builder.strip(), images["PYTHON_IMAGE"], report)
            run_stack(data, images, report)
    report.numbers["stack_test_wall_s"] = round(time.monotonic() - started, 1)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(vars(report), indent=2) + "\n", encoding="utf-8")
    log(f"all {len(report.checks)} checks passed; {json.dumps(report.numbers)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StackError as e:
        print(f"stack-test: FAIL {e}", file=sys.stderr, flush=True)
        sys.exit(1)
