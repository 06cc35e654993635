"""The taskvision command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from api.main import create_app
from api.settings import Settings

TASKVISION = str(Path(sys.executable).with_name("taskvision"))


def test_users_create_prints_only_a_working_token(tmp_path: Path) -> None:
    result = subprocess.run(
        [TASKVISION, "users", "create", "carol", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    token = result.stdout
    assert re.fullmatch(r"[0-9a-f]{40}\n", token)
    app = create_app(Settings(data_dir=tmp_path))
    try:
        client = TestClient(app, headers={"Authorization": f"Token {token.strip()}"})
        assert client.get("/account/v2/user").json()["username"] == "carol"
    finally:
        app.state.services.engine.dispose()

    again = subprocess.run(
        [TASKVISION, "users", "create", "carol", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1 and again.stdout == "" and "already exists" in again.stderr


def test_database_url_comes_from_the_environment(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere.db"
    env = {"TASKVISION_DATABASE_URL": f"sqlite:///{db}", "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [TASKVISION, "users", "create", "dave", "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        check=True,
        env=env,
        timeout=60,
    )
    assert db.exists() and not (tmp_path / "data" / "taskvision.db").exists()


def test_config_show_prints_the_effective_configuration_without_secrets(tmp_path: Path) -> None:
    import json

    env = {
        "PATH": "/usr/bin:/bin",
        "TASKVISION_DATABASE_URL": "postgresql+psycopg://tv:hunter2@db.internal/taskvision",
        "TASKVISION_STORAGE_URL": "s3://models?endpoint=http://minio:9000",
        "TASKVISION_S3_ACCESS_KEY": "AKIAEXAMPLE",
        "TASKVISION_S3_SECRET_KEY": "wJalrXUtnFEMI",
        "TASKVISION_KFP_HOST": "http://ml-pipeline.kubeflow:8888",
        "TASKVISION_SERVING_BACKEND": "kserve",
    }
    result = subprocess.run(
        [TASKVISION, "config", "show", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    )
    for secret in ("hunter2", "AKIAEXAMPLE", "wJalrXUtnFEMI"):
        assert secret not in result.stdout
    shown = json.loads(result.stdout)
    assert shown["database_url"] == "postgresql+psycopg://tv:***@db.internal/taskvision"
    assert shown["storage_url"] == "s3://models?endpoint=http://minio:9000"
    assert (shown["pipeline_runner"], shown["serving_backend"]) == ("kubeflow", "kserve")


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TASKVISION, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_import_bundle_without_a_data_dir_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = _cli("import-bundle", str(tmp_path), "--task", "t", "--data-dir", str(missing))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: no TaskVision data in")
    assert "Traceback" not in result.stderr and not missing.exists()


def test_users_list_and_rotate_token(tmp_path: Path) -> None:
    first = _cli("users", "create", "erin", "--data-dir", str(tmp_path)).stdout.strip()
    _cli("users", "create", "frank", "--data-dir", str(tmp_path))
    listed = _cli("users", "list", "--data-dir", str(tmp_path))
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert lines[0] == "name\tworkspace\tcreated\ttokens"
    assert [line.split("\t")[0] for line in lines[1:]] == ["erin", "frank"]
    assert lines[1].split("\t")[3] == f"{first[:5]}..."
    assert first not in listed.stdout  # only the first characters, never a whole token

    rotated = _cli("users", "rotate-token", "erin", "--data-dir", str(tmp_path))
    assert rotated.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}\n", rotated.stdout)
    new = rotated.stdout.strip()
    app = create_app(Settings(data_dir=tmp_path))
    try:
        old_client = TestClient(app, headers={"Authorization": f"Token {first}"})
        new_client = TestClient(app, headers={"Authorization": f"Token {new}"})
        assert old_client.get("/account/v2/user").status_code == 401
        assert new_client.get("/account/v2/user").json()["username"] == "erin"
    finally:
        app.state.services.engine.dispose()
    unknown = _cli("users", "rotate-token", "nobody", "--data-dir", str(tmp_path))
    assert unknown.returncode == 1 and unknown.stderr.endswith("error: no user named 'nobody'\n")


def test_config_show_prints_absolute_paths(tmp_path: Path) -> None:
    import json

    (tmp_path / "work").mkdir()
    shown = json.loads(_cli("config", "show", "--data-dir", "rel", cwd=tmp_path / "work").stdout)
    data_dir = tmp_path / "work" / "rel"
    assert shown["data_dir"] == str(data_dir)
    assert shown["database_url"] == f"sqlite:///{data_dir / 'taskvision.db'}"
    assert shown["storage_url"] == str(data_dir / "blobs")
