"""The three container images, checked without a Docker engine.

Each Dockerfile is parsed (FROM, RUN, COPY, USER, ENTRYPOINT/CMD...) and checked: it
copies what ``pip install .`` needs, installs the project, runs as a non-root user, and
its entry point is one that works in this venv (run with ``--help``, or imported).
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import MANIFESTS, REPO_ROOT, run_entry_point

DOCKER = REPO_ROOT / "dockerfiles"
IMAGES = ("api", "serving", "train")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY...
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order; continuation lines joined, comments and blank lines dropped."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines, too
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON array of an ENTRYPOINT/CMD; the shell form (no signals to the app) is refused."""
    try:
        value = json.loads(instruction.args)
    except json.JSONDecodeError:
        value = None
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        f"line {instruction.line}: {instruction.keyword} must be in exec form (a JSON array)"
    )
    return value


def dockerfile(image: str) -> list[Instruction]:
    return parse_dockerfile((DOCKER / f"{image}.Dockerfile").read_text())


def last(instructions: list[Instruction], keyword: str) -> Instruction | None:
    """The instruction that wins (the last one of its keyword), or None."""
    found = [i for i in instructions if i.keyword == keyword]
    return found[-1] if found else None


def the(instructions: list[Instruction], keyword: str) -> Instruction:
    found = last(instructions, keyword)
    assert found is not None, f"no {keyword} instruction"
    return found


def copy_sources(instruction: Instruction) -> list[str]:
    parts = [p for p in instruction.args.split() if not p.startswith("--")]
    return parts[:-1]


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_the_parser_reads_continuations_comments_and_forms() -> None:
    parsed = parse_dockerfile(
        'FROM python:3.11-slim\n# note\nRUN a \\\n  # inside\n  && b\nCMD ["python"]\nENTRYPOINT python x\n'
    )
    assert [(i.keyword, i.args, i.line) for i in parsed] == [
        ("FROM", "python:3.11-slim", 1),
        ("RUN", "a && b", 3),
        ("CMD", '["python"]', 6),
        ("ENTRYPOINT", "python x", 7),
    ]
    assert exec_form(parsed[2]) == ["python"]
    with pytest.raises(AssertionError, match="exec form"):
        exec_form(parsed[3])


@pytest.mark.parametrize("image", IMAGES)
def test_builds_on_python_slim_in_one_stage(image: str) -> None:
    instructions = dockerfile(image)
    assert instructions[0].keyword in ("FROM", "ARG")
    assert [i.args for i in instructions if i.keyword == "FROM"] == ["python:3.11-slim"]


@pytest.mark.parametrize("image", IMAGES)
def test_copies_what_pip_install_needs(image: str) -> None:
    instructions = dockerfile(image)
    copied = [src for i in instructions if i.keyword == "COPY" for src in copy_sources(i)]
    for source in copied:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: no such path in the repository"
    # pyproject.toml, the readme it names, and every package setuptools is told to find.
    project = pyproject()
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"pyproject.toml", project["project"]["readme"], *packages} <= set(copied)
    # ... none of which the image's .dockerignore leaves out of the build context.
    ignore = DOCKER / f"{image}.Dockerfile.dockerignore"
    if ignore.exists():
        patterns = [p for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
        for source in copied:
            assert not any(fnmatch.fnmatch(source, p) for p in patterns), f"{source} is dockerignored"


@pytest.mark.parametrize("image", IMAGES)
def test_installs_the_project(image: str) -> None:
    instructions = dockerfile(image)
    installs = [
        i for i in instructions if i.keyword == "RUN" and re.search(r"pip install\b[^&;|]*\s\.(\s|$)", i.args)
    ]
    assert installs, "no RUN pip install . (the project with its dependencies)"
    copies = [i.line for i in instructions if i.keyword == "COPY"]
    assert max(copies) < installs[0].line, "pip install . runs before the sources are copied"


@pytest.mark.parametrize("image", IMAGES)
def test_runs_as_a_non_root_user(image: str) -> None:
    instructions = dockerfile(image)
    user = last(instructions, "USER")
    assert user is not None, "no USER: the container would run as root"
    uid = user.args.split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
    assert uid.isdigit() and int(uid) != 0
    install = next(i for i in instructions if i.keyword == "RUN" and "pip install" in i.args)
    assert user.line > install.line, "USER comes before the install (pip would not be able to write)"


def _manifest(path: str) -> dict:
    return yaml.safe_load((MANIFESTS / "base" / path).read_text())


def test_images_match_what_the_manifests_expect() -> None:
    """The user and ports the Deployment and ServingRuntime assume are the images' own."""
    deployment = _manifest("api-deployment.yaml")
    api = dockerfile("api")
    assert the(api, "USER").args.split(":")[0] == str(
        deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    )
    assert the(api, "EXPOSE").args == str(
        deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    )
    runtime = _manifest("servingruntime.yaml")["spec"]["containers"][0]
    serving = dockerfile("serving")
    assert the(serving, "USER").args.split(":")[0] == str(runtime["securityContext"]["runAsUser"])
    assert the(serving, "EXPOSE").args == str(runtime["ports"][0]["containerPort"])


def test_api_image_runs_taskvision_serve(api_serve_help: str) -> None:
    instructions = dockerfile("api")
    entrypoint = exec_form(the(instructions, "ENTRYPOINT"))
    cmd = exec_form(the(instructions, "CMD"))
    assert entrypoint + cmd == ["taskvision", "serve", "--host", "0.0.0.0", "--port", "8000"]
    # `taskvision` is the project's console script, and it runs here (--help proves the import).
    assert pyproject()["project"]["scripts"]["taskvision"] == "api.cli:main"
    assert "--host" in api_serve_help and "--port" in api_serve_help


def test_serving_image_runs_python_m_serving(serving_help: str) -> None:
    instructions = dockerfile("serving")
    assert exec_form(the(instructions, "ENTRYPOINT")) == ["python", "-m", "serving"]
    assert last(instructions, "CMD") is None  # the ServingRuntime's args follow the entry point
    for option in ("--model-dir", "--model_name", "--http_port"):
        assert option in serving_help


def test_train_image_has_kfp_and_the_components(tmp_path: Path) -> None:
    instructions = dockerfile("train")
    # KFP sets the container's command (python3 -m kfp.dsl.executor_main ...): no ENTRYPOINT.
    assert last(instructions, "ENTRYPOINT") is None
    assert exec_form(the(instructions, "CMD")) == ["python"]
    # kfp comes with the project (components are compiled with install_kfp_package=False).
    assert any(re.match(r"kfp\b", dep) for dep in pyproject()["project"]["dependencies"])
    result = run_entry_point(
        [sys.executable, "-c", "import kfp, kfp.dsl.executor_main, components.train, components.lib.train"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr


def test_the_dockerfiles_folder_does_not_break_kfp_local() -> None:
    """From the repository root, ``import docker`` must not find a folder of ours.

    kfp.local imports the docker SDK when it can and crashes on a module without DockerClient.
    """
    result = run_entry_point([sys.executable, "-c", "import kfp.local.task_dispatcher"], cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
