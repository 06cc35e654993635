"""schemathesis hooks for ``test_schemathesis.py``: a work-around for one schemathesis bug, nothing else.

Before it reports a negative multipart case that we accepted (ST201, "schema-violating request
accepted"), schemathesis 4.32 checks whether the fields it actually sent are valid after all
(``checks._form_body_is_valid_as_sent``): a field mutated into an empty array sends no part, so
an optional boolean "mutated" to ``[]`` is simply absent. That check validates a file part by
its generated value, ``bytes``, which its JSON Schema validator refuses (``ValueError:
Unsupported type: 'bytes'``); the exception is read as "not valid as sent", and a request that
was valid on the wire is reported as accepted invalid data (seen on ``POST
/recognition/v2/training-image`` with ``test_image: []``). Here a file's bytes are validated as
the string (``format: binary``) the schema declares them to be; everything else is unchanged.
Loaded with ``SCHEMATHESIS_HOOKS=<this file>``.
"""

from __future__ import annotations

from typing import Any

from schemathesis.specs.openapi import checks

_form_body_is_valid_as_sent = checks._form_body_is_valid_as_sent


def _files_as_text(response: Any, case: Any, media_type: str) -> bool:
    body = case.body
    if not isinstance(body, dict) or not any(isinstance(v, bytes | bytearray) for v in body.values()):
        return _form_body_is_valid_as_sent(response, case, media_type)
    case.body = {k: v.decode("latin-1") if isinstance(v, bytes | bytearray) else v for k, v in body.items()}
    try:
        return _form_body_is_valid_as_sent(response, case, media_type)
    finally:
        case.body = body


checks._form_body_is_valid_as_sent = _files_as_text
