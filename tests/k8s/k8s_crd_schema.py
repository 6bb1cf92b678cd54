"""Validate custom resources against their CRDs the way the Kubernetes API server admits them.

No API server runs here, so this reproduces the steps a `kubectl apply` (server-side field
validation "Strict", kubectl's default) goes through for a custom resource, in the server's order:

1. unknown fields are rejected (``x-kubernetes-preserve-unknown-fields`` and
   ``x-kubernetes-embedded-resource`` respected);
2. nulls are dropped from fields that are not ``nullable``;
3. defaults from the schema are filled in (so a required field with a default is satisfied);
4. the OpenAPI schema is checked (types, enums, patterns, required, int-or-string, int32/int64
   ranges, ``x-kubernetes-list-type`` set/map uniqueness);
5. the CEL rules in ``x-kubernetes-validations`` are evaluated with cel-python. Transition rules
   (those that read ``oldSelf``) only run on update and are skipped; anything cel-python cannot
   compile or evaluate is reported as an error, never skipped.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import celpy
import jsonschema
import yaml

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_EMBEDDED_FIELDS = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}


@dataclass(frozen=True)
class _Version:
    schema: dict
    served: bool


class CRDRegistry:
    """The CRDs of one folder, by (group, version, kind)."""

    def __init__(self, crd_dir: Path):
        if not crd_dir.is_dir():
            raise FileNotFoundError(
                f"CRD folder {crd_dir} is missing: the KubeRay CRDs are expected in "
                "shared/kuberay-crds/<version>/ beside the repository (../shared from the repo root)"
            )
        self._versions: dict[tuple[str, str, str], _Version] = {}
        for path in sorted(crd_dir.glob("*.yaml")):
            for crd in yaml.load_all(path.read_text(), Loader=_YAML_LOADER):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    key = (group, version["name"], kind)
                    self._versions[key] = _Version(version["schema"]["openAPIV3Schema"], version.get("served", False))
        if not self._versions:
            raise FileNotFoundError(f"no CustomResourceDefinition found in {crd_dir}")

    def handles(self, obj: dict) -> bool:
        group = obj.get("apiVersion", "").split("/")[0]
        return any(g == group for g, _, _ in self._versions)

    def validate(self, obj: dict) -> list[str]:
        """Every reason the API server would refuse to create `obj`; empty when it would admit it."""
        api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
        group, _, version = api_version.partition("/")
        entry = self._versions.get((group, version, kind))
        if entry is None:
            return [f"no CRD defines {kind} in {api_version}"]
        if not entry.served:
            return [f"{kind} {api_version} is not served by its CRD"]
        return admit(copy.deepcopy(obj), entry.schema)


def admit(obj: dict, schema: dict) -> list[str]:
    """Run the API server's steps on `obj` (mutated in place: pruned and defaulted)."""
    errors = _metadata_errors(obj.get("metadata"))
    errors += list(_unknown_fields(obj, schema, "", is_root=True))
    _drop_nulls_and_default(obj, schema)
    validator = jsonschema.Draft7Validator(to_json_schema(schema))
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        errors.append(f"{_dotted(error.absolute_path)}: {error.message}")
    errors += list(_list_type_errors(obj, schema, ""))
    errors += list(_cel_errors(obj, schema, ""))
    return errors


def _metadata_errors(metadata: Any) -> list[str]:
    # The root `metadata` of a CR is validated as ObjectMeta by the server, not by the CRD schema.
    if not isinstance(metadata, dict):
        return ["metadata: required object"]
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        return ["metadata.name: required"]
    if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        return [f"metadata.name: {name!r} is not a DNS-1123 subdomain"]
    return []


def _dotted(path: Any) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in path]
    return "".join(parts).lstrip(".") or "<root>"


def _child(path: str, key: Any) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))


def _subschemas(value: Any, schema: dict, path: str) -> Iterator[tuple[Any, dict, str]]:
    """(child value, its schema, its path) for each child a structural schema describes: a
    property, an additionalProperties entry or a list item: the unknown-field, default and CEL walks."""
    if isinstance(value, dict):
        properties, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        for key, item in list(value.items()):
            sub = properties[key] if key in properties else (extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield item, sub, _child(path, key)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield item, schema["items"], _child(path, index)


def _unknown_fields(value: Any, schema: dict, path: str, is_root: bool = False) -> Iterator[str]:
    if isinstance(value, dict):
        properties = schema.get("properties")
        known = dict(properties or {})
        if schema.get("x-kubernetes-embedded-resource") or is_root:
            known = {**_EMBEDDED_FIELDS, **known}
        if properties is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            for key in value:
                if key not in known:
                    yield f"{_child(path, key)}: unknown field"
    for item, sub, where in _subschemas(value, schema, path):
        yield from _unknown_fields(item, sub, where)


def _drop_nulls_and_default(value: Any, schema: dict) -> None:
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key in [k for k, v in value.items() if v is None]:
            if not (properties.get(key) or {}).get("nullable"):
                del value[key]
        for key, prop in properties.items():
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
    for item, sub, _ in _subschemas(value, schema, ""):
        _drop_nulls_and_default(item, sub)


def to_json_schema(schema: dict) -> dict:
    """A structural OpenAPI v3 schema as a JSON Schema (draft 7). Unknown fields are not its
    business: _unknown_fields reports them with their path."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key == "items" and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        elif key == "not":
            out[key] = to_json_schema(value)
        elif key in ("description", "default", "nullable", "format", "exclusiveMinimum", "exclusiveMaximum") or key.startswith("x-"):
            continue
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if schema.get("format") in _INT_RANGES and schema.get("type") == "integer":
        low, high = _INT_RANGES[schema["format"]]
        out.setdefault("minimum", low)
        out.setdefault("maximum", high)
    for bound, keyword in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if schema.get(keyword) is True:  # OpenAPI v3's boolean form
            out[keyword] = out.pop(bound)
    if schema.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_type_errors(value: Any, schema: dict, path: str) -> Iterator[str]:
    if isinstance(value, list):
        item_schema = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen: set = set()
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    continue
                missing = [k for k in keys if k not in item]
                if missing:
                    yield f"{_child(path, index)}: list-map key {missing} missing"
                    continue
                key = tuple(repr(item[k]) for k in keys)
                if key in seen:
                    yield f"{_child(path, index)}: duplicate entry for list-map keys {dict(zip(keys, (item[k] for k in keys)))}"
                seen.add(key)
        for index, item in enumerate(value):
            yield from _list_type_errors(item, item_schema, _child(path, index))
    elif isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key, item in value.items():
            sub = properties.get(key) or (schema["additionalProperties"] if isinstance(schema.get("additionalProperties"), dict) else {})
            yield from _list_type_errors(item, sub, _child(path, key))


_CEL_ENV = celpy.Environment()
_CEL_PROGRAMS: dict[str, Any] = {}


def _cel_program(rule: str) -> Any:
    if rule not in _CEL_PROGRAMS:
        _CEL_PROGRAMS[rule] = _CEL_ENV.program(_CEL_ENV.compile(rule))
    return _CEL_PROGRAMS[rule]


def _is_transition_rule(rule: str) -> bool:
    return re.search(r"\boldSelf\b", rule) is not None


def _cel_errors(value: Any, schema: dict, path: str) -> Iterator[str]:
    for validation in schema.get("x-kubernetes-validations", []):
        rule = validation["rule"]
        if _is_transition_rule(rule):
            if validation.get("optionalOldSelf"):
                yield f"{path or '<root>'}: CEL rule {rule!r} with optionalOldSelf is not supported here"
            continue  # a create has no old object: the server skips transition rules
        try:
            result = _cel_program(rule).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as error:  # noqa: BLE001 - any failure to evaluate is a refusal
            yield f"{path or '<root>'}: CEL rule {rule!r} could not be evaluated: {error}"
            continue
        if isinstance(result, celpy.CELEvalError):
            yield f"{path or '<root>'}: CEL rule {rule!r} could not be evaluated: {result}"
        elif result is not True and result != celpy.celtypes.BoolType(True):
            yield f"{path or '<root>'}: {validation.get('message') or 'failed rule: ' + rule}"
    for item, sub, where in _subschemas(value, schema, path):
        yield from _cel_errors(item, sub, where)
