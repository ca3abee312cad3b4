"""Validate custom resources against their CRDs' openAPIV3Schema, strictly, offline.

    python tests/infra/validate_crds.py [--crd-dir DIR] FILE [FILE ...]   (FILE may be '-')

Every document of every FILE (multi-document YAML) is sorted into one of:
  * a built-in kind (core, apps, batch, autoscaling, policy, *.k8s.io): skipped here,
    `kubernetes-validate --strict` covers those;
  * a kind with a CRD in --crd-dir (default ../shared/schemas/crds next to the project:
    RayCluster, VirtualService, DestinationRule): validated against the served version's
    openAPIV3Schema, made strict as the CRD README describes:
      - `additionalProperties: false` wherever `properties` is given and neither
        `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` is set
        (the API server would silently prune a typo; here it is an error),
      - `nullable: true` honoured, `apiVersion`/`kind`/`metadata` added at the root where the
        CRD leaves them out (Istio), `metadata` checked as ObjectMeta (name required);
    CEL rules (`x-kubernetes-validations`) are not evaluated;
  * a kind on NO_SCHEMA_KINDS (Istio security resources, no CRD copy here): structural
    checks only, reported as such;
  * anything else: an error (an unknown custom kind cannot be checked, so it is not let through).

Exit status 0 when everything passed, 1 otherwise; each failure names the file, the object
and the JSON path of the bad field.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CRD_DIR = PROJECT_ROOT.parent / "shared" / "schemas" / "crds"

BUILTIN_GROUPS = {"", "apps", "batch", "autoscaling", "policy"}

# Custom kinds used by infra/ for which no CRD schema is available offline.
NO_SCHEMA_KINDS = {
    ("security.istio.io", "PeerAuthentication"),
    ("security.istio.io", "AuthorizationPolicy"),
}

DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN},
        "namespace": {"type": "string", "maxLength": 63, "pattern": DNS1123_LABEL},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "generateName": {"type": "string"},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
}


def is_builtin(api_version: str) -> bool:
    group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
    return group in BUILTIN_GROUPS or group.endswith(".k8s.io")


def strictify(schema: Any) -> Any:
    """Return a copy of an OpenAPI v3 (structural) schema that rejects unknown fields."""
    if isinstance(schema, list):
        return [strictify(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: strictify(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, (dict, list)):
            out[key] = strictify(value)
        else:
            # allOf/anyOf/oneOf/not hold constraint fragments (required lists, enums), which
            # must not gain additionalProperties: false; leave them as they are.
            out[key] = value
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def root_schema(openapi: dict, group: str, version: str, kind: str) -> dict:
    schema = strictify(copy.deepcopy(openapi))
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version}"]}
    props["kind"] = {"type": "string", "enum": [kind]}
    props["metadata"] = OBJECT_META
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    schema["additionalProperties"] = False
    # `status` is written by controllers, never by us.
    props.pop("status", None)
    return schema


@dataclass(frozen=True)
class CrdVersion:
    group: str
    kind: str
    version: str
    schema: dict


def load_crds(crd_dir: Path) -> dict[tuple[str, str, str], CrdVersion]:
    """(group, version, kind) -> strict schema, for every served version of every CRD file."""
    if not crd_dir.is_dir():
        raise FileNotFoundError(f"CRD folder not found: {crd_dir} (pass --crd-dir)")
    table: dict[tuple[str, str, str], CrdVersion] = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            group, kind = spec["group"], spec["names"]["kind"]
            for v in spec["versions"]:
                if not v.get("served", False):
                    continue
                openapi = v["schema"]["openAPIV3Schema"]
                table[(group, v["name"], kind)] = CrdVersion(
                    group, kind, v["name"], root_schema(openapi, group, v["name"], kind)
                )
    if not table:
        raise FileNotFoundError(f"no CustomResourceDefinition found in {crd_dir}")
    return table


def _path(err: jsonschema.ValidationError) -> str:
    parts = ["$"]
    for p in err.absolute_path:
        parts.append(f"[{p}]" if isinstance(p, int) else f".{p}")
    return "".join(parts)


def _ident(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace", "<no namespace>") if isinstance(meta, dict) else "?"
    name = meta.get("name", "<no name>") if isinstance(meta, dict) else "?"
    return f"{doc.get('kind', '?')} {ns}/{name}"


def check_no_schema_kind(doc: dict) -> list[str]:
    """Structural checks for custom kinds without a CRD copy."""
    errors = []
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        errors.append("$.metadata.name: required")
    elif not isinstance(meta.get("namespace"), str):
        errors.append("$.metadata.namespace: required (namespaced kind)")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        errors.append("$.spec: must be a mapping")
        return errors
    kind = doc.get("kind")
    if kind == "AuthorizationPolicy":
        if spec.get("action", "ALLOW") not in ("ALLOW", "DENY", "AUDIT", "CUSTOM"):
            errors.append(f"$.spec.action: {spec.get('action')!r} is not one of ALLOW, DENY, AUDIT, CUSTOM")
        if not isinstance(spec.get("rules", []), list):
            errors.append("$.spec.rules: must be a list")
    if kind == "PeerAuthentication":
        mode = (spec.get("mtls") or {}).get("mode", "UNSET")
        if mode not in ("UNSET", "DISABLE", "PERMISSIVE", "STRICT"):
            errors.append(f"$.spec.mtls.mode: {mode!r} is not one of UNSET, DISABLE, PERMISSIVE, STRICT")
    return errors


def iter_documents(paths: list[str]) -> Iterator[tuple[str, int, Any]]:
    for p in paths:
        text = sys.stdin.read() if p == "-" else Path(p).read_text(encoding="utf-8")
        for i, doc in enumerate(yaml.safe_load_all(text)):
            if doc is not None:
                yield p, i, doc


def validate(paths: list[str], crd_dir: Path, out=sys.stdout) -> int:
    crds = load_crds(crd_dir)
    served = sorted({(c.group, c.kind) for c in crds.values()})
    failures = checked = 0
    for path, index, doc in iter_documents(paths):
        where = f"{path}[{index}]"
        if not isinstance(doc, dict) or not isinstance(doc.get("apiVersion"), str) or not doc.get("kind"):
            print(f"FAIL {where}: not a Kubernetes object (apiVersion and kind required)", file=out)
            failures += 1
            continue
        api_version, kind = doc["apiVersion"], doc["kind"]
        if is_builtin(api_version):
            continue
        group, _, version = api_version.rpartition("/")
        ident = _ident(doc)
        checked += 1
        if (group, kind) in NO_SCHEMA_KINDS:
            errors = check_no_schema_kind(doc)
            for e in errors:
                print(f"FAIL {where} {ident}: {e}", file=out)
            if errors:
                failures += 1
            else:
                print(f"ok   {where} {ident} (structure only: no CRD schema available offline)", file=out)
            continue
        crd = crds.get((group, version, kind))
        if crd is None:
            known = ", ".join(f"{k} ({g})" for g, k in served)
            if any(g == group and k == kind for g, k in served):
                versions = sorted(c.version for c in crds.values() if c.group == group and c.kind == kind)
                print(f"FAIL {where} {ident}: {api_version} is not a served version (served: {versions})", file=out)
            else:
                print(f"FAIL {where} {ident}: no CRD schema for {kind} in {group!r}; known: {known}", file=out)
            failures += 1
            continue
        validator = jsonschema.Draft4Validator(crd.schema)
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        for err in errors[:20]:
            print(f"FAIL {where} {ident}: {_path(err)}: {err.message}", file=out)
        if errors:
            failures += 1
        else:
            print(f"ok   {where} {ident} against {crd_dir.name}/{group}/{version} {kind} (strict)", file=out)
    print(f"validate_crds: {checked} custom resource(s) checked, {failures} failed", file=out)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Validate custom resources against CRD openAPIV3Schema (strict).")
    ap.add_argument("files", nargs="+", help="multi-document YAML files, '-' for stdin")
    ap.add_argument("--crd-dir", type=Path, default=DEFAULT_CRD_DIR)
    args = ap.parse_args(argv)
    try:
        return validate(args.files, args.crd_dir)
    except (FileNotFoundError, yaml.YAMLError) as exc:
        print(f"validate_crds: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
