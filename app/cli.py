"""The `slimgpt` command. Subcommands import their heavy modules only when they run."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.core.config import get_settings
    from app.core.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_json, settings.log_level)
    if settings.embedded and not settings.auth_disabled:
        _bootstrap_local_key(settings)
    from app.main import create_app

    app = create_app(settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=settings.log_level.lower(),
                proxy_headers=True)
    return 0


def _bootstrap_local_key(settings) -> None:  # type: ignore[no-untyped-def]
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


def _db(args: argparse.Namespace) -> int:
    from app.core.config import get_settings
    from app.db import migrate

    url = str(get_settings().database_url)
    if args.db_command == "upgrade":
        migrate.upgrade(url, args.revision)
    else:
        migrate.downgrade(url, args.revision)
    print(f"database at {args.revision}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from app.core.config import get_settings
    from app.crud.tenants import create_api_key, revoke_api_key
    from app.db.migrate import upgrade
    from app.db.session import session_scope

    settings = get_settings()
    if settings.auto_migrate:
        upgrade(str(settings.database_url))
    with session_scope(settings) as session:
        if args.keys_command == "create":
            record, full = create_api_key(session, args.tenant, name=args.name)
            print(f"key id: {record.id}  tenant: {args.tenant}", file=sys.stderr)
            print("store this key now; it is not shown again:", file=sys.stderr)
            print(full)
            return 0
        if not revoke_api_key(session, args.key_id):
            print(f"no API key {args.key_id}", file=sys.stderr)
            return 1
        print(f"revoked {args.key_id}")
        return 0


def _worker(args: argparse.Namespace) -> int:
    """A Celery worker with the same settings as the API (imports the worker package lazily)."""
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    if args.queue:
        settings = settings.model_copy(update={"celery_queue": args.queue})
    if not settings.broker_url:
        print("slimgpt worker needs SLIMGPT_BROKER_URL (redis://...); without a broker, "
              "`slimgpt serve` runs jobs on its embedded in-process worker", file=sys.stderr)
        return 2
    from worker.celery_app import make_celery, worker_argv

    argv = worker_argv(settings, hostname=args.hostname)
    if args.loglevel:
        argv[argv.index("--loglevel") + 1] = args.loglevel
    make_celery(settings).worker_main(argv)
    return 0


def _dispatcher(args: argparse.Namespace) -> int:
    """The dispatcher in the foreground (it also runs inside every API process unless
    SLIMGPT_DISPATCHER_ENABLED=false; the candidates elect one leader through Postgres)."""
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
    dispatcher = Dispatcher(settings, get_session_factory(settings))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: dispatcher.request_stop())
    dispatcher.run_forever()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from app.client_cli import EXIT_CODES_HELP, add_client_commands, add_global_options

    parser = argparse.ArgumentParser(prog="slimgpt", description="SlimGPT pruning service",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=EXIT_CODES_HELP)
    add_global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    try:
        from slimgpt_core.cli_args import add_prune_parser
    except ImportError:  # the algorithm's CLI is not in this build
        pass
    else:
        add_prune_parser(sub)

    from app.demo import add_demo_parser

    add_demo_parser(sub)

    serve = sub.add_parser("serve", help="run the API (embedded mode also runs the worker)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(handler=_serve)

    work = sub.add_parser("worker", help="run a Celery GPU worker (production mode)")
    work.add_argument("--queue", default=None, help="queue to consume (default: "
                      "SLIMGPT_CELERY_QUEUE)")
    work.add_argument("--hostname", default=None, help="Celery node name, e.g. gpu0@%%h")
    work.add_argument("--loglevel", default=None, help="INFO (default), DEBUG, WARNING, ...")
    work.set_defaults(handler=_worker)

    disp = sub.add_parser("dispatcher", help="run the job dispatcher (publishes committed jobs, "
                          "requeues those of lost workers; leader-elected, also runs in the API)")
    disp.set_defaults(handler=_dispatcher)

    db = sub.add_parser("db", help="database migrations")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="apply migrations (default: to head)")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(handler=_db)
    down = db_sub.add_parser("downgrade", help="revert migrations (default: to base, i.e. empty)")
    down.add_argument("revision", nargs="?", default="base")
    down.set_defaults(handler=_db)

    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key for a tenant and print it once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default=None, help="a label for the key")
    create.set_defaults(handler=_keys)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_keys)

    # Client commands against a running service: submit, batch, status, list, cancel, logs,
    # download (app/client_cli.py), and `worker`.
    add_client_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
