#!/bin/sh
# First start: initdb into $PGDATA with POSTGRES_USER / POSTGRES_PASSWORD, password auth for
# every network client, and POSTGRES_DB created. Later starts: run the server on the data there.
set -eu
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
user="${POSTGRES_USER:-postgres}"
db="${POSTGRES_DB:-$user}"

if [ "${1:-}" = "postgres" ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile="$(mktemp)"
    printf '%s' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb --pgdata="$PGDATA" --username="$user" --pwfile="$pwfile" --encoding=UTF8 \
        --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256
    rm -f "$pwfile"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$db" != "postgres" ]; then
        # A private socket and no TCP while the database is created, so health checks
        # (pg_isready on the default socket) only pass once the real server is up.
        initsock="$(mktemp -d)"
        pg_ctl --pgdata="$PGDATA" --wait --silent \
            -o "-c listen_addresses='' -c unix_socket_directories=$initsock" start
        createdb --host="$initsock" --username="$user" "$db"
        pg_ctl --pgdata="$PGDATA" --wait --silent --mode=fast stop
        rmdir "$initsock"
    fi
fi
if [ "${1:-}" = "postgres" ]; then
    shift
    set -- postgres -D "$PGDATA" "$@"
fi
exec "$@"
