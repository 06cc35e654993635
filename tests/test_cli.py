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
