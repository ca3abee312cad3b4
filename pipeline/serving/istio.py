"""Production traffic split: weights in an Istio ``VirtualService``, set through the Kubernetes API.

Written against the API server's REST interface with ``requests`` (the ``kubernetes`` client
is not a dependency): ``GET`` the VirtualService, change what this router owns, and ``PATCH``
it back as a JSON merge patch (``application/merge-patch+json``) carrying
``metadata.resourceVersion``: a concurrent edit makes the API server answer 409, and the
change is retried on the fresh object instead of silently overwriting it. A merge patch
replaces arrays whole, so the patch carries the full ``spec.http`` list read from the server
with only the owned parts changed: other routes, and the split route's match, timeout and
retries, are kept. A missing VirtualService is created (POST) in ``version`` mode only;
in ``track`` mode it belongs to the infrastructure (RBAC: get + patch).

Owned parts:

* the ``route`` list of the http route named ``route_name`` (``/predictions/<model>``): one
  weighted destination per subset. Every destination also sets the response header
  ``X-ASR-Routed-Version`` (other header settings, e.g. ``x-asr-track``, are kept);
* routes ``<route_name>-v-<version>`` placed before it: ``/predictions/<model>/<version>`` ->
  that version's subset (explicit versions, e.g. for the paired WER probes).

Subsets (``serving.istio.subset_mode``):

* ``track`` (default, ``infra/k8s/base/serving/istio.yaml``): two fixed subsets,
  ``production`` and ``canary`` (one TorchServe Deployment each). Which version runs on which
  track is recorded in the annotations ``asr-retune.io/production-version`` and
  ``asr-retune.io/canary-version``; a version not yet mapped takes the production track when
  it is empty, else the canary track. Both destinations are always listed (weights sum to
  100, 0 allowed), in the order production, canary. Re-pointing the production Deployment to
  a promoted version is the serving backend's job; it then calls :meth:`IstioRouter.set_tracks`.
* ``version``: one subset per version, ``<subset_prefix><version>`` (lowercased, ``._`` -> ``-``).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import requests

from pipeline.config import IstioConfig
from pipeline.serving.router import ROUTED_VERSION_HEADER, Router, RouterError, check_weights

GROUP_VERSION = "networking.istio.io/v1"
MERGE_PATCH = "application/merge-patch+json"
PRODUCTION_ANNOTATION = "asr-retune.io/production-version"
CANARY_ANNOTATION = "asr-retune.io/canary-version"
_COPIED_ROUTE_KEYS = ("timeout", "retries", "headers", "corsPolicy", "fault")


class IstioRouter(Router):
    """The split of one model's traffic, kept in the VirtualService ``serving.istio`` names."""

    def __init__(self, config: IstioConfig, *, model_name: str, session: requests.Session | None = None):
        self.config = config
        self.model_name = model_name
        self.session = session or requests.Session()
        api = config.api_server.rstrip("/")
        self.collection_url = f"{api}/apis/{GROUP_VERSION}/namespaces/{config.namespace}/virtualservices"
        self.url = f"{self.collection_url}/{config.virtual_service}"
        self._name = f"VirtualService {config.namespace}/{config.virtual_service}"

    # -- Kubernetes API ------------------------------------------------------------------
    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        token_file = self.config.token_file
        if token_file and Path(token_file).is_file():
            headers["Authorization"] = f"Bearer {Path(token_file).read_text(encoding='utf-8').strip()}"
        return headers

    def _verify(self) -> bool | str:
        if not self.config.verify_tls:
            return False
        ca = self.config.ca_file
        return ca if ca and Path(ca).is_file() else True

    def _call(self, method: str, url: str, *, json_body: Any = None, content_type: str | None = None) -> requests.Response:
        try:
            return self.session.request(
                method, url, json=json_body, headers=self._headers(content_type),
                timeout=self.config.timeout_s, verify=self._verify(),
            )  # fmt: skip
        except requests.RequestException as exc:
            raise RouterError(f"Kubernetes API {method} {url} failed: {exc}") from None

    def get(self) -> dict[str, Any] | None:
        r = self._call("GET", self.url)
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise RouterError(f"GET {self._name} -> HTTP {r.status_code}: {r.text[:500]}")
        return r.json()

    # -- subsets -------------------------------------------------------------------------
    @staticmethod
    def tracks(vs: dict[str, Any] | None) -> dict[str, str | None]:
        notes = ((vs or {}).get("metadata") or {}).get("annotations") or {}
        return {"production": notes.get(PRODUCTION_ANNOTATION), "canary": notes.get(CANARY_ANNOTATION)}

    def _assign(self, weights: dict[str, float], tracks: dict[str, str | None]) -> dict[str, str | None]:
        """Track mode: map every weighted version to a track, keeping the recorded mapping.

        A new version takes the production track only while it is empty (cold start), else
        the canary track when that is free or carries no weight; anything else means the
        mapping is stale (a promoted version was never moved to the production Deployment).
        """
        tracks = dict(tracks)
        for version in sorted(weights, key=lambda v: -weights[v]):  # the larger share first
            if version in (tracks["production"], tracks["canary"]):
                continue
            if tracks["production"] is None:
                tracks["production"] = version
            elif tracks["canary"] is None or tracks["canary"] not in weights:
                tracks["canary"] = version
            else:
                raise RouterError(
                    f"no track for version {version}: production serves {tracks['production']}, canary serves "
                    f"{tracks['canary']}; re-point the production Deployment and call set_tracks() first"
                )
        return tracks

    def _subset(self, version: str, tracks: dict[str, str | None]) -> str:
        c = self.config
        if c.subset_mode == "version":
            return f"{c.subset_prefix}{version}".lower().replace("_", "-").replace(".", "-")
        if version == tracks["production"]:
            return c.production_subset
        if version == tracks["canary"]:
            return c.canary_subset
        raise RouterError(f"version {version} runs on no track ({tracks})")

    # -- rendering -----------------------------------------------------------------------
    def _destination(self, subset: str, version: str | None, weight: float | None, existing: dict | None) -> dict[str, Any]:
        d = copy.deepcopy(existing) if existing else {}
        dest = d.setdefault("destination", {})
        dest.update(host=self.config.host, subset=subset, port={"number": self.config.port})
        response = d.setdefault("headers", {}).setdefault("response", {})
        setters = response.setdefault("set", {})
        if version:
            setters[ROUTED_VERSION_HEADER] = version
        else:
            setters.pop(ROUTED_VERSION_HEADER, None)
            if not setters:
                response.pop("set")
            if not response:
                d["headers"].pop("response")
            if not d["headers"]:
                d.pop("headers")
        if weight is None:
            d.pop("weight", None)
        else:
            d["weight"] = int(weight)
        return d

    def _owns_explicit(self, route: dict[str, Any]) -> bool:
        return str(route.get("name", "")).startswith(f"{self.config.route_name}-v-")

    def render(self, weights: dict[str, float], current: dict[str, Any] | None = None) -> dict[str, Any]:
        """The full VirtualService for ``weights``: ``current`` with the owned parts replaced, or a new one."""
        weights = check_weights(weights)
        if any(float(w) != int(w) for w in weights.values()):
            raise RouterError(f"Istio weights are whole percents, got {weights}")
        c, base = self.config, f"/predictions/{self.model_name}"
        vs = copy.deepcopy(current) if current else {
            "apiVersion": GROUP_VERSION,
            "kind": "VirtualService",
            "metadata": {"name": c.virtual_service, "namespace": c.namespace, "labels": {"app.kubernetes.io/managed-by": "asr-retune"}},
            "spec": {"hosts": list(c.hosts), **({"gateways": list(c.gateways)} if c.gateways else {}), "http": []},
        }  # fmt: skip
        tracks = self._assign(weights, self.tracks(vs)) if c.subset_mode == "track" else {"production": None, "canary": None}
        http = [r for r in vs.setdefault("spec", {}).get("http") or [] if not self._owns_explicit(r)]
        split = next((r for r in http if r.get("name") == c.route_name), None)
        if split is None:
            split = {"name": c.route_name, "match": [{"uri": {"prefix": base}}]}
            http.insert(0, split)
        by_subset = {(d.get("destination") or {}).get("subset"): d for d in split.get("route") or []}
        if c.subset_mode == "track":
            order = [(c.production_subset, tracks["production"]), (c.canary_subset, tracks["canary"])]
            routed = [(s, v, weights.get(v, 0.0) if v else 0.0) for s, v in order]
        else:
            routed = [(self._subset(v, tracks), v, w) for v, w in sorted(weights.items()) if w > 0]
        split["route"] = [self._destination(s, v if v in weights else None, w, by_subset.get(s)) for s, v, w in routed]
        explicit = []
        for version in sorted(weights):
            route = {
                "name": f"{c.route_name}-v-{version}",
                "match": [{"uri": {"exact": f"{base}/{version}"}}],
                **{k: copy.deepcopy(split[k]) for k in _COPIED_ROUTE_KEYS if k in split},
                "route": [self._destination(self._subset(version, tracks), version, None, by_subset.get(self._subset(version, tracks)))],
            }
            route["route"][0].pop("weight", None)
            explicit.append(route)
        at = http.index(split)
        vs["spec"]["http"] = http[:at] + explicit + http[at:]
        if c.subset_mode == "track":
            notes = vs.setdefault("metadata", {}).setdefault("annotations", {})
            for track, key in (("production", PRODUCTION_ANNOTATION), ("canary", CANARY_ANNOTATION)):
                if tracks[track]:
                    notes[key] = tracks[track]
                else:
                    notes.pop(key, None)
        return vs

    # -- Router --------------------------------------------------------------------------
    def ensure_running(self) -> None:
        """The mesh runs on its own; only check that the API answers."""
        self.get()

    def set_weights(self, weights: dict[str, float], *, attempts: int = 5) -> None:
        self._apply(lambda current: self.render(weights, current), f"weights {weights}", attempts)

    def set_tracks(self, *, production: str, canary: str | None = None, attempts: int = 5) -> None:
        """Track mode: record which version each track's Deployment now serves (after re-pointing one)."""

        def update(current: dict[str, Any] | None) -> dict[str, Any]:
            if current is None:
                raise RouterError(f"{self._name} not found")
            vs = copy.deepcopy(current)
            notes = vs.setdefault("metadata", {}).setdefault("annotations", {})
            notes[PRODUCTION_ANNOTATION] = production
            if canary:
                notes[CANARY_ANNOTATION] = canary
            else:
                notes.pop(CANARY_ANNOTATION, None)
            return vs

        self._apply(update, f"tracks production={production} canary={canary}", attempts)

    def _apply(self, change, what: str, attempts: int) -> None:
        for attempt in range(1, attempts + 1):
            current = self.get()
            if current is None:
                if self.config.subset_mode == "track":
                    raise RouterError(
                        f"{self._name} not found: in track mode it is part of the infrastructure "
                        "(infra/k8s/base/serving/istio.yaml); apply it first"
                    )
                r = self._call("POST", self.collection_url, json_body=change(None), content_type="application/json")
                if r.status_code in (200, 201):
                    return
            else:
                wanted = change(current)
                old_notes = (current.get("metadata") or {}).get("annotations") or {}
                new_notes = (wanted.get("metadata") or {}).get("annotations") or {}
                notes_patch = {k: new_notes.get(k) for k in set(old_notes) | set(new_notes) if old_notes.get(k) != new_notes.get(k)}
                patch: dict[str, Any] = {
                    "metadata": {"resourceVersion": (current.get("metadata") or {}).get("resourceVersion")},
                    "spec": {"http": wanted["spec"]["http"]},
                }
                if notes_patch:
                    patch["metadata"]["annotations"] = notes_patch  # a null removes an annotation
                r = self._call("PATCH", self.url, json_body=patch, content_type=MERGE_PATCH)
                if r.status_code == 200:
                    return
            if r.status_code != 409 or attempt == attempts:
                raise RouterError(f"setting {what} on {self._name} -> HTTP {r.status_code}: {r.text[:500]}")
            time.sleep(0.2 * attempt)  # conflict: someone else changed it; re-read and retry

    def weights(self) -> dict[str, float]:
        current = self.get()
        if not current:
            return {}
        for route in current.get("spec", {}).get("http") or []:
            if route.get("name") == self.config.route_name:
                out = {}
                for d in route.get("route") or []:
                    version = d.get("headers", {}).get("response", {}).get("set", {}).get(ROUTED_VERSION_HEADER)
                    if version and float(d.get("weight", 100)) > 0:
                        out[version] = float(d.get("weight", 100))
                return out
        return {}

    def target(self, version: str | None = None) -> tuple[str, dict[str, str]]:
        path = f"/predictions/{self.model_name}" + (f"/{version}" if version else "")
        return f"http://{self.config.host}:{self.config.port}{path}", {}  # in the mesh: the sidecar adds mTLS
