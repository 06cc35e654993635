"""schemathesis hooks for ``test_schemathesis.py``: a work-around for one schemathesis bug, nothing else.

Before it reports a negative multipart case that we accepted (ST201, "schema-violating request
accepted"), schemathesis 4.32 checks whether the fields it actually sent are valid after all
(``checks._form_body_is_valid_as_sent``): a field mutated into an empty array sends no part, so
an optional ``meta_data`` "mutated" to ``[]`` is simply absent. That check validates a file
part by its generated value, a ``Binary`` (a ``str`` subclass holding bytes), which its JSON
Schema validator refuses (``ValueError: Unsupported type: 'Binary'``); the exception is read
as "not valid as sent", and a request that was valid on the wire is reported as accepted
invalid data (seen on ``POST /recognition/v2/training-image`` with ``meta_data: []`` and with
``test_image: []``). Here a file part is validated as the string (``format: binary``) the
schema declares it to be; everything else is unchanged.
Loaded with ``SCHEMATHESIS_HOOKS=<this file>``.
"""

from __future__ import annotations

from typing import Any

from schemathesis.specs.openapi import checks

_form_body_is_valid_as_sent = checks._form_body_is_valid_as_sent


_JSON_TYPES = (str, int, float, bool, type(None), list, dict)  # exact types: Binary subclasses str


class _WithFilesAsText:
    """``case`` as the check reads it, with each file part's value replaced by a string."""

    def __init__(self, case: Any) -> None:
        self._case = case
        self.body = {k: v if type(v) in _JSON_TYPES else "<file>" for k, v in case.body.items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._case, name)


def _files_as_text(response: Any, case: Any, media_type: str) -> bool:
    view = _WithFilesAsText(case) if isinstance(case.body, dict) else case
    return _form_body_is_valid_as_sent(response, view, media_type)


checks._form_body_is_valid_as_sent = _files_as_text
