"""Validate custom resources (KServe's InferenceService, ServingRuntime...) against their CRD schemas.

Kubernetes checks a custom resource against the ``openAPIV3Schema`` of its
CustomResourceDefinition and then *prunes* every field the schema does not
declare, silently: a typo like ``spec.predictor.minReplica`` is accepted and
dropped. So a test that only runs JSON Schema would pass objects that do not do
what we meant. ``validate_custom_resource`` checks three things:

1. JSON Schema validation of the whole object (types, enums, required fields,
   patterns), with ``metadata`` checked as a Kubernetes ObjectMeta (its known
   fields, DNS-1123 ``name``, valid label keys and values); like the API server, a null
   field is dropped first unless its schema says ``nullable: true``;
2. an unknown-field walk: every key must be declared by the schema (``properties``),
   unless the schema allows extra keys (``additionalProperties`` or
   ``x-kubernetes-preserve-unknown-fields: true``);
3. list semantics the API server enforces (``x-kubernetes-list-type`` ``set`` and
   ``map`` entries must be unique).

Usage (the CRDs live in ``shared/crds/kserve/`` beside the repository)::

    from tests.support.k8s_schemas import load_crd_schemas, validate_custom_resource

    schemas = load_crd_schemas()            # {(apiVersion, kind): openAPIV3Schema}
    validate_custom_resource(isvc, schemas)  # raises SchemaViolationError / SchemaNotFoundError

A fake API server can call ``custom_resource_errors(obj, schemas)`` to get the
problems as a list of strings (empty when the object is valid) and answer 422.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

__all__ = [
    "DEFAULT_CRD_DIR",
    "OBJECT_META_SCHEMA",
    "CustomResourceError",
    "SchemaNotFoundError",
    "SchemaViolationError",
    "custom_resource_errors",
    "load_crd_schemas",
    "unknown_fields",
    "validate_custom_resource",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
# shared/ sits beside the repository (../shared from the repo root).
DEFAULT_CRD_DIR = REPO_ROOT.parent / "shared" / "crds" / "kserve"

Schemas = Mapping[tuple[str, str], Mapping[str, Any]]


class CustomResourceError(ValueError):
    """Base class: a custom resource that the Kubernetes API server would not accept as it is."""


class SchemaNotFoundError(CustomResourceError, LookupError):
    """No CRD in the loaded schemas defines this apiVersion and kind (the API server would answer 404)."""


class SchemaViolationError(CustomResourceError):
    """The object breaks its CRD schema; ``errors`` lists every problem as ``"<field path>: <what>"``."""

    def __init__(self, what: str, errors: list[str]) -> None:
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{what} is not valid against its CRD schema ({len(errors)} problem(s)):\n{lines}")


# --- ObjectMeta -------------------------------------------------------------------------------------
# A CRD declares its root ``metadata`` as a bare ``type: object``; the API server validates it as an
# ObjectMeta instead. This is ObjectMeta (meta/v1) as a structural schema.

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["apiVersion", "kind", "name", "uid"],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "name": {"type": "string"},
                    "uid": {"type": "string"},
                    "controller": {"type": "boolean"},
                    "blockOwnerDeletion": {"type": "boolean"},
                },
            },
        },
        # Set by the API server; accepted (and ignored or checked) on write.
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": "string"},
        "deletionTimestamp": {"type": "string"},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "selfLink": {"type": "string"},
        "managedFields": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "apiVersion": {"type": "string"},
                    "fieldsType": {"type": "string"},
                    "fieldsV1": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    "manager": {"type": "string"},
                    "operation": {"type": "string"},
                    "subresource": {"type": "string"},
                    "time": {"type": "string"},
                },
            },
        },
    },
}

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _metadata_errors(meta: Any) -> list[str]:
    """What the API server checks in ObjectMeta beyond types: names, label keys and values."""
    if not isinstance(meta, dict):
        return []  # the JSON Schema check reports the type
    errors: list[str] = []
    name = meta.get("name")
    if not name and not meta.get("generateName"):
        errors.append("metadata.name: required (or metadata.generateName)")
    if isinstance(name, str) and name and (len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name)):
        errors.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain (lowercase a-z, 0-9, '-', '.')")
    namespace = meta.get("namespace")
    if isinstance(namespace, str) and (len(namespace) > 63 or not _DNS1123_LABEL.match(namespace)):
        errors.append(f"metadata.namespace: {namespace!r} is not a DNS-1123 label")
    for key, value in (meta.get("labels") or {}).items():
        if not _qualified_name_ok(key):
            errors.append(f"metadata.labels: key {key!r} is not a qualified name ([prefix/]name)")
        if isinstance(value, str) and (len(value) > 63 or not _LABEL_VALUE.match(value)):
            errors.append(f"metadata.labels.{key}: value {value!r} is not a valid label value (<= 63 chars)")
    for key in meta.get("annotations") or {}:
        if not _qualified_name_ok(key):
            errors.append(f"metadata.annotations: key {key!r} is not a qualified name ([prefix/]name)")
    return errors


def _qualified_name_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_QUALIFIED_NAME.match(name))


# --- loading ----------------------------------------------------------------------------------------


def load_crd_schemas(crd_dir: Path | str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Read every CustomResourceDefinition in ``crd_dir`` (``*.yaml``, default: shared/crds/kserve).

    Returns ``{(apiVersion, kind): openAPIV3Schema}`` for each *served* version of each CRD,
    e.g. ``("serving.kserve.io/v1beta1", "InferenceService")``. The schemas are shared
    between callers (loading is cached): treat them as read-only.
    """
    directory = Path(crd_dir) if crd_dir is not None else DEFAULT_CRD_DIR
    return dict(_load_cached(str(directory.resolve())))


@functools.cache
def _load_cached(directory: str) -> dict[tuple[str, str], dict[str, Any]]:
    path = Path(directory)
    files = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"No CRD files (*.yaml) in {path}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for file in files:
        with file.open() as fh:
            for doc in yaml.load_all(fh, Loader=loader):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
                for version in doc["spec"]["versions"]:
                    if not version.get("served", True):
                        continue
                    schema = (version.get("schema") or {}).get("openAPIV3Schema")
                    if schema is None:
                        raise ValueError(f"{file.name}: {kind} {version['name']} has no openAPIV3Schema")
                    schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


# --- validation -------------------------------------------------------------------------------------


def validate_custom_resource(obj: Mapping[str, Any], schemas: Schemas) -> None:
    """Raise unless the API server would store ``obj`` exactly as it is.

    Raises:
        SchemaNotFoundError: no schema for the object's ``apiVersion`` and ``kind``.
        SchemaViolationError: the object breaks the schema or has a field the schema does not
            declare (which Kubernetes would silently prune); ``.errors`` lists every problem.
    """
    errors = custom_resource_errors(obj, schemas)
    if errors:
        name = (obj.get("metadata") or {}).get("name", "<no name>")
        raise SchemaViolationError(f"{obj.get('kind')} {name!r} ({obj.get('apiVersion')})", errors)


def custom_resource_errors(obj: Mapping[str, Any], schemas: Schemas) -> list[str]:
    """Every problem with ``obj`` as ``"<field path>: <what>"``; an empty list when it is valid.

    Raises ``SchemaNotFoundError`` when no schema matches its ``apiVersion`` and ``kind``.
    """
    key = (obj.get("apiVersion"), obj.get("kind"))
    schema = schemas.get(key)  # type: ignore[call-overload]
    if schema is None:
        known = ", ".join(f"{v} {k}" for v, k in sorted(schemas))
        raise SchemaNotFoundError(
            f"No CRD schema for apiVersion={key[0]!r} kind={key[1]!r} (known: {known or 'none'})"
        )
    effective = _with_object_meta(schema)
    obj = _drop_nulls(obj, effective)
    errors = [_describe(e) for e in _validator(effective).iter_errors(obj)]
    errors += _metadata_errors(obj.get("metadata"))
    errors += unknown_fields(obj, effective)
    errors += _list_errors(obj, effective)
    return sorted(set(errors))


def unknown_fields(value: Any, schema: Mapping[str, Any], path: str = "") -> list[str]:
    """Paths in ``value`` that ``schema`` does not declare, i.e. that Kubernetes would prune.

    An object may only have the keys in its schema's ``properties`` (including those in
    ``allOf``/``anyOf``/``oneOf`` branches) unless the schema has ``additionalProperties``
    (extra values are then checked against it when it is a schema) or
    ``x-kubernetes-preserve-unknown-fields: true``. Lists are walked through ``items``.
    """
    found: list[str] = []
    if isinstance(value, dict):
        if not _describes_object(schema):
            return found  # a type mismatch: JSON Schema reports it
        properties = _all_properties(schema)
        additional = schema.get("additionalProperties")
        keeps_unknown = bool(schema.get("x-kubernetes-preserve-unknown-fields")) or additional is True
        embedded = bool(schema.get("x-kubernetes-embedded-resource"))
        for key, child in value.items():
            child_path = f"{path}.{key}" if path else str(key)
            if key in properties:
                found += unknown_fields(child, properties[key], child_path)
            elif isinstance(additional, dict):
                found += unknown_fields(child, additional, child_path)
            elif keeps_unknown or (embedded and key in ("apiVersion", "kind", "metadata")):
                continue
            else:
                found.append(
                    f"{child_path}: unknown field (the schema does not declare it; Kubernetes drops it)"
                )
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


# --- helpers ----------------------------------------------------------------------------------------


def _drop_nulls(value: Any, schema: Mapping[str, Any]) -> Any:
    """A copy of ``value`` without the null fields that the API server prunes before validating.

    Kubernetes drops a field whose value is null unless its schema says ``nullable: true``
    (so a client's ``to_dict()`` full of ``None`` is fine). Nulls inside lists are kept.
    """
    if isinstance(value, dict):
        properties, additional = _all_properties(schema), schema.get("additionalProperties")
        out = {}
        for key, child in value.items():
            sub = properties.get(key, additional if isinstance(additional, dict) else {})
            if child is None and not sub.get("nullable"):
                continue
            out[key] = _drop_nulls(child, sub)
        return out
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [_drop_nulls(item, items) for item in value]
    return value


def _with_object_meta(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The CRD schema with its root ``metadata`` validated as an ObjectMeta."""
    effective = dict(schema)
    effective["properties"] = {**schema.get("properties", {}), "metadata": OBJECT_META_SCHEMA}
    effective.setdefault("required", [])
    effective["required"] = sorted({*effective["required"], "apiVersion", "kind", "metadata"})
    return effective


def _nullable_type(validator: Any, types: Any, instance: Any, schema: Mapping[str, Any]) -> Iterator[Any]:
    """OpenAPI v3's ``nullable: true`` lets a typed field be null; JSON Schema has no such keyword."""
    if instance is None and schema.get("nullable"):
        return
    yield from jsonschema.Draft4Validator.VALIDATORS["type"](validator, types, instance, schema)


# OpenAPI v3.0 schemas are close to JSON Schema draft 4 (boolean exclusiveMinimum, no const).
_OpenAPIValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"type": _nullable_type})


def _validator(schema: dict[str, Any]) -> Any:
    return _OpenAPIValidator(schema)


def _describe(error: jsonschema.ValidationError) -> str:
    message = error.message if len(error.message) <= 300 else error.message[:297] + "..."
    return f"{_format_path(error.absolute_path) or '<root>'}: {message}"


def _format_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describes_object(schema: Mapping[str, Any]) -> bool:
    return schema.get("type") in (None, "object") and (
        "properties" in schema
        or "additionalProperties" in schema
        or schema.get("type") == "object"
        or bool(schema.get("x-kubernetes-preserve-unknown-fields"))
    )


def _all_properties(schema: Mapping[str, Any]) -> dict[str, Any]:
    properties = dict(schema.get("properties", {}))
    for junctor in ("allOf", "anyOf", "oneOf"):
        for branch in schema.get(junctor, []):
            properties.update(_all_properties(branch))
    return properties


def _list_errors(value: Any, schema: Mapping[str, Any], path: str = "") -> list[str]:
    """Duplicates in ``x-kubernetes-list-type`` ``set``/``map`` lists (the API server refuses them)."""
    found: list[str] = []
    if isinstance(value, dict) and _describes_object(schema):
        properties, additional = _all_properties(schema), schema.get("additionalProperties")
        for key, child in value.items():
            sub = properties.get(key, additional if isinstance(additional, dict) else None)
            if sub is not None:
                found += _list_errors(child, sub, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        list_type, keys = schema.get("x-kubernetes-list-type"), schema.get("x-kubernetes-list-map-keys", [])
        seen: set[str] = set()
        for i, item in enumerate(value):
            if list_type == "set":
                marker = repr(item)
            elif list_type == "map" and isinstance(item, dict):
                marker = repr(tuple(item.get(k) for k in keys))
            else:
                marker = None
            if marker is not None:
                if marker in seen:
                    found.append(f"{path}[{i}]: duplicate entry in a list of type {list_type} ({marker})")
                seen.add(marker)
            found += _list_errors(item, schema["items"], f"{path}[{i}]")
    return found
