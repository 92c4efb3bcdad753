#!/bin/sh
# Entrypoint of the local postgres image, compatible with the official one for what
# the lab manager uses: POSTGRES_PASSWORD (required unless POSTGRES_HOST_AUTH_METHOD=trust),
# POSTGRES_USER [postgres], POSTGRES_DB [$POSTGRES_USER]; data in $PGDATA; arguments that
# start with "-" (`-c name=value`) go to postgres; started as root it fixes ownership of
# $PGDATA and drops to the postgres user.
#
# Fast first start: the cluster was made at build time (otree-lab-initdb) and Docker
# copies it into a new volume; here only the role, password and database are set, in
# single-user mode (no server and no socket meanwhile, so pg_isready answers only once
# the real server is up).
set -eu

MARKER="$PGDATA/.otree-lab-unconfigured"

case "${1:-}" in
    -*) set -- postgres "$@" ;;
esac

sql_literal() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/''/g")"; }
sql_ident() { printf '"%s"' "$(printf '%s' "$1" | sed 's/"/""/g')"; }

configure() {
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    if [ "${POSTGRES_HOST_AUTH_METHOD:-}" = trust ]; then
        sed -i 's/scram-sha-256$/trust/' "$PGDATA/pg_hba.conf"
    elif [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "error: the database is uninitialised and POSTGRES_PASSWORD is not set." >&2
        echo "       Set POSTGRES_PASSWORD (or POSTGRES_HOST_AUTH_METHOD=trust, never on a shared network)." >&2
        exit 1
    fi
    # Statements end with ";" and an empty line (-j). They may run a second time after
    # an interrupted first start: "already exists" / "does not exist" are fine then.
    u=$(sql_ident "$user")
    sql=""
    if [ "$user" != postgres ]; then
        sql="CREATE ROLE $u SUPERUSER LOGIN;

"
    fi
    if [ -n "${POSTGRES_PASSWORD:-}" ]; then
        sql="${sql}ALTER ROLE $u PASSWORD $(sql_literal "$POSTGRES_PASSWORD");

"
    fi
    if [ "$db" = postgres ]; then
        sql="${sql}DROP DATABASE IF EXISTS otree_lab_spare;

"
    else
        d=$(sql_ident "$db")
        sql="${sql}ALTER DATABASE otree_lab_spare RENAME TO $d;

ALTER DATABASE $d OWNER TO $u;

"
    fi
    out=$(printf '%s' "$sql" | postgres --single -j -D "$PGDATA" postgres 2>&1) || {
        echo "$out" >&2; echo "error: setting up the role and database failed" >&2; exit 1; }
    errors=$(printf '%s\n' "$out" | grep -E '(ERROR|FATAL|PANIC):' \
             | grep -vE 'role .* already exists|database "otree_lab_spare" does not exist' || :)
    if [ -n "$errors" ]; then
        echo "$out" >&2; echo "error: setting up the role and database failed" >&2; exit 1
    fi
    # Docker's copy into the volume is not necessarily on disk yet: make it durable.
    initdb --sync-only -D "$PGDATA" >/dev/null
    rm -f "$MARKER"
    echo "PostgreSQL init: ready (user $user, database $db)"
}

if [ "${1:-}" = postgres ]; then
    if [ "$(id -u)" = 0 ]; then
        mkdir -p "$PGDATA" /var/run/postgresql
        chmod 700 "$PGDATA" || :
        find "$PGDATA" \! -user postgres -exec chown postgres:postgres '{}' +
        chown postgres:postgres /var/run/postgresql
        chmod 3777 /var/run/postgresql
        exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
    fi
    if [ ! -s "$PGDATA/PG_VERSION" ]; then
        if [ -n "$(ls -A "$PGDATA")" ]; then
            echo "error: $PGDATA is not empty but holds no PostgreSQL cluster (no PG_VERSION)." >&2
            exit 1
        fi
        otree-lab-initdb "$PGDATA"  # an empty directory that got no copy of the image's cluster
    fi
    if [ -e "$MARKER" ]; then
        configure
    fi
fi

exec "$@"
