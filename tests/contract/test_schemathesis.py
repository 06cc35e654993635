"""The API against its own OpenAPI document: schemathesis, all four phases, on the real server.

``st run`` (the schemathesis CLI, as a user would run it) drives ``taskvision
serve`` over HTTP: the examples, coverage and fuzzing phases on every
operation, then the stateful phase over the links it finds between create,
read, update and delete. Every check is on (schemathesis.toml explains the one
setting: a schema-valid request may be refused with a 400 when it asks for
something impossible; ``schemathesis_hooks.py`` works around one schemathesis
bug). The suite fails on any failed check, any schema error and any runtime
error: a route that breaks its own schema breaks the build.

``TASKVISION_ST_SEED`` replays a run; ``TASKVISION_ST_MAX_TIME`` changes its length.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import image_bytes
from tests.support.live_server import LiveServer, running_server

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]
ST = Path(sys.executable).with_name("st")
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")  # a work-around for a schemathesis bug
# A fixed seed by default, so a red run can be replayed; the phases share one time budget.
SEED = os.environ.get("TASKVISION_ST_SEED", "20261203")
MAX_TIME_S = os.environ.get("TASKVISION_ST_MAX_TIME", "100")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running_server(tmp_path_factory.mktemp("contract")) as live:
        yield live


def test_the_api_keeps_to_its_own_schema(server: LiveServer) -> None:
    result = subprocess.run(
        [
            str(ST),
            "run",
            f"{server.ip_url}openapi.json",
            "--header",
            f"Authorization: Token {server.token}",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--checks",
            "all",
            "--workers",
            "1",  # one thread: CPython 3.11's AST builder (used by hypothesis) is not thread-safe
            "--max-time",
            MAX_TIME_S,
            "--seed",
            SEED,
            "--no-color",
        ],
        cwd=REPO,  # schemathesis.toml
        capture_output=True,
        text=True,
        timeout=int(MAX_TIME_S) + 240,
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": str(HOOKS)},
    )
    report = result.stdout + result.stderr
    summary = report[report.rfind("SUMMARY") :] if "SUMMARY" in report else report[-4000:]
    assert result.returncode == 0, f"schemathesis failed:\n{report[-20000:]}"
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅ {phase}", summary), f"phase {phase} did not pass:\n{summary}"
    assert "Failures:" not in summary and "Errors:" not in summary, summary
    tested = re.search(r"Tested: (\d+)", summary)
    assert tested is not None and int(tested.group(1)) >= 40, summary


def test_the_work_around_reads_an_upload_as_sent(server: LiveServer) -> None:
    """The hook's case: a multipart upload whose optional ``meta_data`` is ``[]`` sends only the file,
    which is valid; schemathesis' own re-check says otherwise until the hook is loaded (once a
    schemathesis release fixes it, `before` is True here: drop the hook)."""
    import schemathesis
    from schemathesis.core import hooks
    from schemathesis.specs.openapi import checks
    from schemathesis.transport.serialization import Binary

    operation = schemathesis.openapi.from_url(f"{server.ip_url}openapi.json")[
        "/recognition/v2/training-image"
    ]["POST"]
    png = image_bytes(1)
    case = operation.Case(
        body={"img_path": Binary(png), "meta_data": []},
        media_type="multipart/form-data",
        headers={"Authorization": f"Token {server.token}"},
    )
    response = case.call()
    assert response.status_code == 201, response.text
    assert b'name="meta_data"' not in response.request.body  # an empty array sends no part
    before = checks._form_body_is_valid_as_sent(response, case, "multipart/form-data")
    hooks.load_from_path(str(HOOKS))
    assert not before and checks._form_body_is_valid_as_sent(response, case, "multipart/form-data")
