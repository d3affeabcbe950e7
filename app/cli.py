"""The `slimgpt` command (typer). Subcommands import their heavy modules only when they run, and
a command whose optional part of the install is missing says which extra to install."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from app import __version__
from app.client_cli import (
    EXIT_CODES_HELP,
    ApiKeyOpt,
    Conn,
    JsonOut,
    QuietOpt,
    TimeoutOpt,
    UrlOpt,
    add_client_commands,
)
from slimgpt_core.cli_args import MissingExtra

cli = typer.Typer(
    name="slimgpt",
    help="SlimGPT pruning service: run the API and workers, prune locally, or drive a running "
    "service (submit, batch, logs, download, ...).",
    epilog=EXIT_CODES_HELP.replace("\n", "\n\n"),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
SERVER = "Server (runs here)"


def _version(value: bool) -> None:
    if value:
        print(f"slimgpt {__version__}")
        raise typer.Exit(0)


@cli.callback()
def root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> None:
    ctx.obj = Conn(url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)


def _import(extra: str, what: str, *modules: str) -> None:
    """Fail with "install the `extra` extra" instead of an ImportError traceback."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise MissingExtra(extra, what, err) from None


@cli.command(rich_help_panel=SERVER)
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
) -> int:
    """Run the API (embedded mode also runs the worker)."""
    _import("service", "slimgpt serve", "uvicorn", "fastapi", "sqlalchemy")
    import uvicorn

    from app.core.config import get_settings
    from app.core.logging import configure_logging, uvicorn_log_config

    settings = get_settings()
    configure_logging(settings.log_json, settings.log_level)
    if settings.embedded and not settings.auth_disabled:
        bootstrap_local_key(settings)
    from app.main import create_app

    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level.lower(),
                log_config=uvicorn_log_config(settings.log_level), access_log=False,
                proxy_headers=True)
    return 0


def bootstrap_local_key(settings: Any) -> None:
    """Embedded first start: with no API key at all, create tenant `local` and write its key to
    <data_dir>/api_key (mode 0600). The key is never logged."""
    import logging
    from pathlib import Path

    from app.crud.tenants import count_api_keys, create_api_key
    from app.db.migrate import upgrade
    from app.db.session import session_scope

    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    if settings.auto_migrate:
        upgrade(str(settings.database_url))
    with session_scope(settings) as session:
        if count_api_keys(session):
            return
        record, full = create_api_key(session, "local", name="embedded bootstrap")
    path = Path(settings.data_dir) / "api_key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(full + "\n")
    logging.getLogger("slimgpt.cli").warning(
        "no API keys existed: created key %s for tenant 'local' and wrote it to %s", record.id, path)


_bootstrap_local_key = bootstrap_local_key  # the name app/demo.py used

db_app = typer.Typer(help="database migrations (Alembic)", no_args_is_help=True)
cli.add_typer(db_app, name="db", rich_help_panel=SERVER)


def _migrate(direction: str, revision: str) -> int:
    _import("service", f"slimgpt db {direction}", "sqlalchemy", "alembic")
    from app.core.config import get_settings
    from app.db import migrate

    url = str(get_settings().database_url)
    (migrate.upgrade if direction == "upgrade" else migrate.downgrade)(url, revision)
    print(f"database at {revision}")
    return 0


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> int:
    """Apply migrations (default: to head)."""
    return _migrate("upgrade", revision)


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "base"
                 ) -> int:
    """Revert migrations (default: to base, i.e. empty)."""
    return _migrate("downgrade", revision)


keys_app = typer.Typer(help="API keys (admin: talks to the database directly)",
                       no_args_is_help=True)
cli.add_typer(keys_app, name="keys", rich_help_panel=SERVER)


def _keys_session() -> Any:
    _import("service", "slimgpt keys", "sqlalchemy", "alembic", "cryptography")
    from app.core.config import get_settings
    from app.db.migrate import upgrade
    from app.db.session import session_scope

    settings = get_settings()
    if settings.auto_migrate:
        upgrade(str(settings.database_url))
    return session_scope(settings)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant (created if new)")],
    name: Annotated[str | None, typer.Option(help="a label for the key")] = None,
) -> int:
    """Create a key for a tenant and print it once."""
    from app.crud.tenants import create_api_key

    with _keys_session() as session:
        record, full = create_api_key(session, tenant, name=name)
    print(f"key id: {record.id}  tenant: {tenant}", file=sys.stderr)
    print("store this key now; it is not shown again:", file=sys.stderr)
    print(full)
    return 0


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id")]) -> int:
    """Revoke a key by its id."""
    from app.crud.tenants import revoke_api_key

    with _keys_session() as session:
        if not revoke_api_key(session, key_id):
            print(f"no API key {key_id}", file=sys.stderr)
            return 1
    print(f"revoked {key_id}")
    return 0


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None,
    json_out: JsonOut = False,
) -> int:
    """List API keys (id, tenant, label, created, revoked); never the secrets."""
    from app.client_cli import _emit_json, _print_table
    from app.crud.tenants import list_api_keys

    with _keys_session() as session:
        rows = [{"id": k.id, "tenant": t, "name": k.name, "created_at": k.created_at,
                 "revoked_at": k.revoked_at} for k, t in list_api_keys(session, tenant)]
    if json_out:
        _emit_json(rows)
    else:
        _print_table(["id", "tenant", "name", "created", "revoked"], [
            [r["id"], r["tenant"], r["name"] or "", str(r["created_at"])[:19],
             str(r["revoked_at"])[:19] if r["revoked_at"] else ""] for r in rows])
    return 0


@cli.command(rich_help_panel=SERVER)
def worker(
    queue: Annotated[str | None, typer.Option(help="queue to consume (default: "
                                                 "SLIMGPT_CELERY_QUEUE)")] = None,
    hostname: Annotated[str | None, typer.Option(help="Celery node name, e.g. gpu0@%h")] = None,
    loglevel: Annotated[str | None, typer.Option(help="INFO (default), DEBUG, WARNING, ...")
                        ] = None,
) -> int:
    """Run a Celery GPU worker (production mode)."""
    _import("worker", "slimgpt worker", "celery", "torch", "transformers", "worker.settings")
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    if queue:
        settings = settings.model_copy(update={"celery_queue": queue})
    if not settings.broker_url:
        print("slimgpt worker needs SLIMGPT_BROKER_URL (redis://...); without a broker, "
              "`slimgpt serve` runs jobs on its embedded in-process worker", file=sys.stderr)
        return 2
    from worker.celery_app import make_celery, worker_argv

    argv = worker_argv(settings, hostname=hostname)
    if loglevel:
        argv[argv.index("--loglevel") + 1] = loglevel
    make_celery(settings).worker_main(argv)
    return 0


@cli.command(rich_help_panel=SERVER)
def dispatcher() -> int:
    """Run the job dispatcher (publishes committed jobs, requeues those of lost workers;
    leader-elected, also runs in the API)."""
    _import("service", "slimgpt dispatcher", "sqlalchemy", "celery")
    import signal

    from app.core.config import get_settings
    from app.core.logging import configure_logging
    from app.db.session import get_session_factory
    from app.dispatcher import Dispatcher

    settings = get_settings()
    configure_logging(settings.log_json, settings.log_level)
    if settings.embedded:
        print("slimgpt dispatcher needs SLIMGPT_BROKER_URL; in embedded mode `slimgpt serve` "
              "runs everything", file=sys.stderr)
        return 2
    d = Dispatcher(settings, get_session_factory(settings))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: d.request_stop())
    d.run_forever()
    return 0


def _register() -> None:
    from app.demo import demo
    from slimgpt_core.cli_args import add_prune_command

    add_prune_command(cli)
    cli.command("demo", rich_help_panel="Local")(demo)
    add_client_commands(cli)


_register()


def command() -> Any:
    """The click command behind the typer app (for tests and documentation)."""
    return typer.main.get_command(cli)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `slimgpt` with ``argv``; returns the exit code (usage errors: 2, with the usage on
    stderr; a missing extra: 2, naming it)."""
    # typer >= 0.20 vendors click (typer._click); older ones use click: take the exceptions
    # from wherever typer's own come from.
    click_exceptions = sys.modules[typer.BadParameter.__module__]
    try:
        rv = command().main(args=list(argv) if argv is not None else None, prog_name="slimgpt",
                            standalone_mode=False)
    except click_exceptions.UsageError as err:
        err.show()
        return 2
    except typer.Abort:
        print("\nslimgpt: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # typer's completion options exit directly
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except MissingExtra as err:
        print(f"slimgpt: {err}", file=sys.stderr)
        return 2
    return int(rv) if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
