"""The ``taskvision`` command: run the control plane and administer users."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from api.settings import Settings


class CommandError(Exception):
    """A problem the command reports in one line (``error: ...``, exit status 1), not a traceback."""


def _settings(args: argparse.Namespace) -> Settings:
    if getattr(args, "data_dir", None):
        return Settings(data_dir=Path(args.data_dir).resolve())
    return Settings(data_dir=Settings().data_dir.resolve())


def _existing_data_dir(settings: Settings) -> Settings:
    """Commands that work on an installation's data: its data dir must be there (embedded mode)."""
    if settings.database_url is None and not (settings.data_dir / "taskvision.db").is_file():
        raise CommandError(
            f"no TaskVision data in {settings.data_dir} (no taskvision.db): pass the --data-dir "
            "the service runs with, or set TASKVISION_DATABASE_URL"
        )
    return settings


def _session_factory(settings: Settings) -> Any:
    from api.db.migrate import upgrade
    from api.db.session import make_engine, make_session_factory

    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    return engine, make_session_factory(engine)


def _serve(args: argparse.Namespace) -> int:
    import gc

    import uvicorn

    from api.main import create_app
    from taskvision.malloc import limit_arenas

    limit_arenas()  # before the server's threads exist; see taskvision/malloc.py
    app = create_app(_settings(args))
    # What start-up loaded (torch, ONNX Runtime, great-expectations: ~400,000 objects) lives as long
    # as the process: out of the collector's sight, a full collection a busy request sets off takes
    # milliseconds instead of 250-350 (measured on the console's 5,000-image pages).
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, proxy_headers=True)
    return 0


def _users_create(args: argparse.Namespace) -> int:
    from api.auth import create_user
    from taskvision.errors import ConflictError

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine, sessions = _session_factory(settings)
    try:
        with sessions() as session:
            _, token = create_user(session, args.name)
    except (ConflictError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    finally:
        engine.dispose()
    print(token)
    return 0


def _users_list(args: argparse.Namespace) -> int:
    """One line per user: name, workspace, created, and the first characters of each token."""
    from sqlalchemy import select
    from sqlalchemy.orm import selectinload

    from api.db.models import User

    engine, sessions = _session_factory(_existing_data_dir(_settings(args)))
    try:
        with sessions() as session:
            users = session.scalars(
                select(User).options(selectinload(User.tokens)).order_by(User.created)
            ).all()
            print("name\tworkspace\tcreated\ttokens")
            for user in users:
                tokens = ",".join(f"{token.prefix}..." for token in user.tokens) or "-"
                print(
                    f"{user.name}\t{user.workspace_id}\t{user.created.isoformat(timespec='seconds')}\t{tokens}"
                )
    finally:
        engine.dispose()
    return 0


def _users_rotate_token(args: argparse.Namespace) -> int:
    """Replace every token of a user with a new one; prints only the new token."""
    from api.auth import rotate_token
    from taskvision.errors import NotFoundError

    engine, sessions = _session_factory(_existing_data_dir(_settings(args)))
    try:
        with sessions() as session:
            token = rotate_token(session, args.name)
    except NotFoundError as exc:
        raise CommandError(str(exc)) from exc
    finally:
        engine.dispose()
    print(token)
    return 0


def _pipeline_compile(args: argparse.Namespace) -> int:
    from pipelines.training import compile_pipeline

    path = compile_pipeline(
        Path(args.output), gpu_count=args.gpus, gpu_type=args.gpu_type, s3_secret=args.s3_secret or None
    )
    print(path)
    return 0


def _import_bundle(args: argparse.Namespace) -> int:
    from api.db.models import Task
    from api.services.versions import import_bundle
    from taskvision.errors import TaskVisionError

    settings = _existing_data_dir(_settings(args))
    engine, sessions = _session_factory(settings)
    blobs = settings.open_blob_store()
    try:
        with sessions() as session:
            task = session.get(Task, args.task)
            if task is None:
                raise CommandError(f"task {args.task} not found")
            model = import_bundle(session, blobs, task, Path(args.path), production=args.production)
            print(
                f"task {task.id}: version {model.version}"
                + (" (production)" if task.production_version == model.version else "")
            )
    except TaskVisionError as exc:
        raise CommandError(str(exc)) from exc
    finally:
        engine.dispose()
    return 0


def _config_show(args: argparse.Namespace) -> int:
    import json

    print(json.dumps(_settings(args).public_view(), indent=2, sort_keys=True, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskvision", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the control plane (embedded defaults: SQLite + local blobs)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", help="where the SQLite DB and blobs live (default ./var)")
    serve.set_defaults(func=_serve)

    users = sub.add_parser("users", help="manage users").add_subparsers(dest="users_command", required=True)
    create = users.add_parser("create", help="create a user with its own workspace; prints its API token")
    create.add_argument("name")
    create.add_argument("--data-dir", help="as for serve")
    create.set_defaults(func=_users_create)
    listed = users.add_parser(
        "list", help="list the users, their workspaces and their tokens' first characters"
    )
    listed.add_argument("--data-dir", help="as for serve")
    listed.set_defaults(func=_users_list)
    rotate = users.add_parser(
        "rotate-token", help="give a user a new API token (prints it); the old one stops working"
    )
    rotate.add_argument("name")
    rotate.add_argument("--data-dir", help="as for serve")
    rotate.set_defaults(func=_users_rotate_token)

    pipeline = sub.add_parser("pipeline", help="the Kubeflow training pipeline").add_subparsers(
        dest="pipeline_command", required=True
    )
    compile_ = pipeline.add_parser(
        "compile", help="write the pipeline's KFP IR YAML (for the Kubeflow UI or kfp.Client)"
    )
    compile_.add_argument("output", help="the YAML file to write")
    compile_.add_argument("--gpus", type=int, default=0, help="GPUs the train step requests (default 0)")
    compile_.add_argument("--gpu-type", default="nvidia.com/gpu", help="accelerator resource name")
    compile_.add_argument(
        "--s3-secret",
        metavar="NAME",
        help="Kubernetes Secret giving every step TASKVISION_S3_ACCESS_KEY / _SECRET_KEY (S3 blob store)",
    )
    compile_.set_defaults(func=_pipeline_compile)

    imported = sub.add_parser("import-bundle", help="register a model bundle as the next version of a task")
    imported.add_argument("path", help="the bundle folder (bundle.json + head.onnx or model.onnx)")
    imported.add_argument("--task", required=True, help="the task id")
    imported.add_argument("--production", action="store_true", help="make it the production version")
    imported.add_argument("--data-dir", help="as for serve")
    imported.set_defaults(func=_import_bundle)

    config = sub.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True
    )
    show = config.add_parser("show", help="print the effective configuration (secrets masked)")
    show.add_argument("--data-dir", help="as for serve")
    show.set_defaults(func=_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Logs go to stderr, so `users create` prints nothing but the token on stdout.
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
