"""Turn a KServe CustomResourceDefinition into a JSON Schema that check-jsonschema can validate manifests against.

    python deploy/kserve/schemas/extract.py CRD.yaml OUT.json

The CRD's openAPIV3Schema is what the API server checks a resource against; three changes make it say offline what
the server says online:

- every object with listed properties and no ``x-kubernetes-preserve-unknown-fields`` gets
  ``additionalProperties: false``, because kubectl's default strict field validation rejects unknown fields where
  plain JSON Schema would let them through (a misspelled field would pass otherwise);
- ``apiVersion`` and ``kind`` must be the CRD's own, so a manifest of another kind fails;
- ``nullable: true`` (OpenAPI) becomes a ``null`` type (JSON Schema).

What it cannot carry: CEL rules (``x-kubernetes-validations``) and the controllers' own checks.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

DIALECT = "http://json-schema.org/draft-07/schema#"


def tighten(node: object) -> None:
    """Close every object that lists its properties, in place; a ``null`` type where OpenAPI says nullable."""
    if isinstance(node, list):
        for item in node:
            tighten(item)
        return
    if not isinstance(node, dict):
        return
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    for key, value in node.items():
        if key == "properties":  # a map of field names: each value is a schema, the names are not keywords
            for schema in value.values():
                tighten(schema)
        else:
            tighten(value)


def extract(crd: dict, version: str | None = None) -> dict:
    """The JSON Schema of ``crd``'s stored version (or of ``version``)."""
    spec = crd["spec"]
    versions = [v for v in spec["versions"] if (v["name"] == version if version else v.get("storage"))]
    if not versions:
        raise SystemExit(f"{spec['names']['kind']}: no version {version or '(storage)'} in {[v['name'] for v in spec['versions']]}")
    name = versions[0]["name"]
    schema = versions[0]["schema"]["openAPIV3Schema"]
    tighten(schema)
    api_version = f"{spec['group']}/{name}"
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": spec["names"]["kind"]}
    # ObjectMeta is not in the CRD (the server owns it): ask for a name, and leave its other fields open.
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return {"$schema": DIALECT, "title": f"{spec['names']['kind']} ({api_version})", **schema}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="the CRD's YAML, e.g. kserve's config/crd/full/serving.kserve.io_inferenceservices.yaml")
    parser.add_argument("out", type=Path, help="where to write the JSON Schema")
    parser.add_argument("--version", help="the CRD version to take (default: its storage version)")
    args = parser.parse_args()
    schema = extract(yaml.safe_load(args.crd.read_text()), args.version)
    # Compact and sorted: the InferenceService schema is 0.7 MB so, 1.7 MB indented, and the same CRD gives the same bytes.
    args.out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
