"""IstioRouter against a tiny local HTTP server that plays the Kubernetes API (no cluster)."""

from __future__ import annotations

import copy
import functools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from pipeline.config import PROJECT_ROOT, IstioConfig
from pipeline.serving.istio import CANARY_ANNOTATION, MERGE_PATCH, PRODUCTION_ANNOTATION, IstioRouter
from pipeline.serving.router import ROUTED_VERSION_HEADER, RouterError

NS, NAME = "asr-retune", "asr-torchserve"
HOST = "asr-torchserve.asr-retune.svc.cluster.local"
PATH = f"/apis/networking.istio.io/v1/namespaces/{NS}/virtualservices/{NAME}"
COLLECTION = f"/apis/networking.istio.io/v1/namespaces/{NS}/virtualservices"
CRD = PROJECT_ROOT.parent / "shared" / "schemas" / "crds" / "virtualservices.networking.istio.io.yaml"
INFRA_VS = PROJECT_ROOT / "infra" / "k8s" / "base" / "serving" / "istio.yaml"


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class FakeKubeAPI:
    """Stores one VirtualService; records every request; can inject conflicts and errors."""

    def __init__(self):
        self.obj: dict | None = None
        self.requests: list[dict] = []
        self.conflicts = 0  # PATCHes to answer with 409 (as if someone else changed the object)
        self.fail_status: int | None = None
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                api.requests.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": json.loads(raw) if raw else None}
                )
                return api.requests[-1]

            def do_GET(self):
                self._record()
                if api.fail_status:
                    return self._reply(api.fail_status, {"kind": "Status", "message": "forbidden"})
                if self.path != PATH or api.obj is None:
                    return self._reply(404, {"kind": "Status", "reason": "NotFound"})
                self._reply(200, api.obj)

            def do_PATCH(self):
                req = self._record()
                if self.path != PATH or api.obj is None:
                    return self._reply(404, {"kind": "Status", "reason": "NotFound"})
                if req["headers"].get("Content-Type") != MERGE_PATCH:
                    return self._reply(415, {"kind": "Status", "message": "unsupported patch type"})
                sent_rv = (req["body"].get("metadata") or {}).get("resourceVersion")
                if api.conflicts > 0:
                    api.conflicts -= 1
                    api.obj["metadata"]["resourceVersion"] = str(int(api.obj["metadata"]["resourceVersion"]) + 1)
                    return self._reply(409, {"kind": "Status", "reason": "Conflict"})
                if sent_rv is not None and sent_rv != api.obj["metadata"]["resourceVersion"]:
                    return self._reply(409, {"kind": "Status", "reason": "Conflict"})
                api.obj = merge_patch(api.obj, req["body"])
                api.obj["metadata"]["resourceVersion"] = str(int(api.obj["metadata"]["resourceVersion"]) + 1)
                self._reply(200, api.obj)

            def do_POST(self):
                req = self._record()
                if self.path != COLLECTION:
                    return self._reply(404, {"kind": "Status"})
                api.obj = copy.deepcopy(req["body"])
                api.obj["metadata"]["resourceVersion"] = "1"
                self._reply(201, api.obj)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def writes(self) -> list[dict]:
        return [r for r in self.requests if r["method"] in ("PATCH", "POST")]


@pytest.fixture
def api():
    fake = FakeKubeAPI()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def make_router(api, tmp_path):
    token = tmp_path / "token"
    token.write_text("sa-token-123\n")

    def make(**overrides) -> IstioRouter:
        cfg = IstioConfig(api_server=api.url, token_file=str(token), ca_file=None, **overrides)
        return IstioRouter(cfg, model_name="asr")

    return make


def track_vs() -> dict:
    """The shape of infra/k8s/base/serving/istio.yaml's VirtualService (production/canary subsets)."""
    def dest(track, weight):
        return {"destination": {"host": HOST, "subset": track, "port": {"number": 8080}}, "weight": weight,
                "headers": {"response": {"set": {"x-asr-track": track}}}}  # fmt: skip

    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": NAME, "namespace": NS, "resourceVersion": "41"},
        "spec": {
            "hosts": [HOST],
            "gateways": ["mesh"],
            "http": [
                {"name": "asr-predictions", "match": [{"uri": {"prefix": "/predictions/asr"}}], "timeout": "30s",
                 "retries": {"attempts": 2, "perTryTimeout": "15s", "retryOn": "connect-failure"},
                 "route": [dest("production", 100), dest("canary", 0)]},  # fmt: skip
                {"name": "metrics", "match": [{"uri": {"prefix": "/metrics"}}], "route": [{"destination": {"host": "m"}}]},
            ],
        },
    }


def split_route(vs: dict) -> dict:
    return next(r for r in vs["spec"]["http"] if r.get("name") == "asr-predictions")


def split_weights(vs: dict) -> list[tuple[str, int, str | None]]:
    return [(d["destination"]["subset"], d["weight"], d.get("headers", {}).get("response", {}).get("set", {}).get(ROUTED_VERSION_HEADER))
            for d in split_route(vs)["route"]]  # fmt: skip


@functools.cache
def _crd_schema() -> dict:
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def validate_against_crd(vs: dict) -> None:
    if not CRD.exists():
        pytest.skip(f"CRD schema not found at {CRD}")
    import jsonschema

    jsonschema.validate({"spec": vs["spec"]}, _crd_schema())


# -- track mode (the default; the infrastructure's VirtualService) ----------------------


def test_track_mode_steps_a_canary_through_the_infra_shape(api, make_router):
    api.obj = track_vs()
    router = make_router()
    router.set_weights({"1": 100})  # cold start: the empty production track takes it
    patch = api.writes()[-1]
    assert patch["method"] == "PATCH" and patch["path"] == PATH
    assert patch["headers"]["Content-Type"] == MERGE_PATCH and patch["headers"]["Authorization"] == "Bearer sa-token-123"
    assert patch["body"]["metadata"] == {"resourceVersion": "41", "annotations": {PRODUCTION_ANNOTATION: "1"}}
    assert split_weights(api.obj) == [("production", 100, "1"), ("canary", 0, None)]

    router.set_weights({"1": 95, "2": 5})
    assert split_weights(api.obj) == [("production", 95, "1"), ("canary", 5, "2")]
    assert router.tracks(api.obj) == {"production": "1", "canary": "2"}
    route = split_route(api.obj)
    assert route["timeout"] == "30s" and route["retries"]["attempts"] == 2  # the infra's settings are kept
    assert route["match"] == [{"uri": {"prefix": "/predictions/asr"}}]
    assert route["route"][1]["headers"]["response"]["set"]["x-asr-track"] == "canary"
    names = [r.get("name") for r in api.obj["spec"]["http"]]
    assert names == ["asr-predictions-v-1", "asr-predictions-v-2", "asr-predictions", "metrics"]  # explicit before the prefix
    explicit = api.obj["spec"]["http"][1]
    assert explicit["match"] == [{"uri": {"exact": "/predictions/asr/2"}}] and explicit["timeout"] == "30s"
    assert explicit["route"][0]["destination"]["subset"] == "canary" and "weight" not in explicit["route"][0]
    assert router.weights() == {"1": 95.0, "2": 5.0}

    router.set_weights({"2": 100})  # promotion: all traffic on the canary track
    assert split_weights(api.obj) == [("production", 0, None), ("canary", 100, "2")]
    assert router.weights() == {"2": 100.0}
    validate_against_crd(api.obj)

    router.set_tracks(production="2")  # the backend re-pointed the production Deployment
    assert api.writes()[-1]["body"]["metadata"]["annotations"] == {PRODUCTION_ANNOTATION: "2", CANARY_ANNOTATION: None}
    router.set_weights({"2": 100})
    assert split_weights(api.obj) == [("production", 100, "2"), ("canary", 0, None)]
    assert [r.get("name") for r in api.obj["spec"]["http"]] == ["asr-predictions-v-2", "asr-predictions", "metrics"]


def test_track_mode_rollback_returns_everything_to_production(api, make_router):
    api.obj = track_vs()
    router = make_router()
    router.set_weights({"1": 100})
    router.set_weights({"1": 75, "2": 25})
    router.set_weights({"1": 100})
    assert split_weights(api.obj) == [("production", 100, "1"), ("canary", 0, None)]
    router.set_weights({"1": 95, "3": 5})  # the next canary reuses the idle canary track
    assert split_weights(api.obj) == [("production", 95, "1"), ("canary", 5, "3")]


def test_track_mode_refuses_a_stale_mapping(api, make_router):
    api.obj = track_vs()
    api.obj["metadata"]["annotations"] = {PRODUCTION_ANNOTATION: "1", CANARY_ANNOTATION: "2"}
    with pytest.raises(RouterError, match="set_tracks"):
        make_router().set_weights({"2": 95, "3": 5})
    assert api.writes() == []


def test_track_mode_never_creates_the_virtual_service(api, make_router):
    with pytest.raises(RouterError, match="infra"):
        make_router().set_weights({"1": 100})
    assert api.writes() == []


def test_the_infra_virtual_service_is_patchable(api, make_router):
    if not INFRA_VS.exists():
        pytest.skip(f"{INFRA_VS} not found")
    docs = [d for d in yaml.safe_load_all(INFRA_VS.read_text()) if d and d.get("kind") == "VirtualService"]
    assert len(docs) == 1
    api.obj = {**docs[0], "metadata": {**docs[0]["metadata"], "resourceVersion": "7"}}
    router = make_router()
    assert (router.config.namespace, router.config.virtual_service) == (docs[0]["metadata"]["namespace"], docs[0]["metadata"]["name"])
    router.set_weights({"1": 100})
    router.set_weights({"1": 75, "2": 25})
    assert [(s, w) for s, w, _ in split_weights(api.obj)] == [("production", 75), ("canary", 25)]
    validate_against_crd(api.obj)


def test_conflict_is_retried_on_the_fresh_object(api, make_router):
    api.obj = track_vs()
    api.conflicts = 1
    make_router().set_weights({"1": 50, "2": 50})
    patches = [r for r in api.writes() if r["method"] == "PATCH"]
    assert len(patches) == 2
    assert patches[0]["body"]["metadata"]["resourceVersion"] == "41"
    assert patches[1]["body"]["metadata"]["resourceVersion"] == "42"  # re-read after the 409
    assert [w for _, w, _ in split_weights(api.obj)] == [50, 50]


# -- version mode -----------------------------------------------------------------------


def test_version_mode_one_subset_per_version_and_foreign_routes_kept(api, make_router):
    api.obj = track_vs()
    api.obj["spec"]["http"][0]["route"] = []
    router = make_router(subset_mode="version")
    router.set_weights({"1": 95, "2": 5})
    assert split_weights(api.obj) == [("v-1", 95, "1"), ("v-2", 5, "2")]
    router.set_weights({"2": 100})
    assert split_weights(api.obj) == [("v-2", 100, "2")]
    assert [r.get("name") for r in api.obj["spec"]["http"]] == ["asr-predictions-v-2", "asr-predictions", "metrics"]
    assert "annotations" not in api.obj["metadata"]


def test_version_mode_creates_a_missing_virtual_service(api, make_router):
    make_router(subset_mode="version").set_weights({"3": 100})
    [post] = api.writes()
    assert post["method"] == "POST" and post["path"] == COLLECTION
    vs = post["body"]
    assert vs["kind"] == "VirtualService" and vs["metadata"]["name"] == NAME and vs["spec"]["hosts"] == [HOST]
    validate_against_crd(vs)
    assert make_router(subset_mode="version").weights() == {"3": 100.0}


# -- both -------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [{"1": 90, "2": 5}, {"1": 99.5, "2": 0.5}, {"bad/version": 100}, {"1": -5, "2": 105}])
def test_invalid_weights_send_nothing(api, make_router, weights):
    api.obj = track_vs()
    with pytest.raises(RouterError):
        make_router().set_weights(weights)
    assert api.writes() == []


def test_api_errors_name_the_object(api, make_router):
    api.fail_status = 403
    with pytest.raises(RouterError, match="asr-retune/asr-torchserve.*403"):
        make_router().set_weights({"1": 100})


def test_client_target_urls(make_router):
    router = make_router()
    assert router.target() == (f"http://{HOST}:8080/predictions/asr", {})
    assert router.target("7")[0] == f"http://{HOST}:8080/predictions/asr/7"
    assert router.requests_since(router.log_mark()) is None  # per-request data comes from the mesh's telemetry
