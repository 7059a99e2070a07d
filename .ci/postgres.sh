#!/usr/bin/env bash
# A PostgreSQL server on 127.0.0.1 for the shared-study test (tests/test_parallel.py): installs
# Debian's postgresql when asked (--install) and missing, starts the newest cluster, creates the
# role and database `evomerge`, and prints the SQLAlchemy URL on stdout (everything else: stderr).
# Needs root (it runs psql as the postgres user). Exit status non-zero: no server to be had.
set -euo pipefail
exec 3>&1 1>&2  # only the URL goes to the caller
# The server outlives this script: it must not inherit the caller's pipes (fd 3 is `$(...)`'s, so
# the caller would wait for it forever, and CI's stdout/stderr would never close).
daemon_log=$(mktemp)
detached() { "$@" </dev/null >"$daemon_log" 2>&1 3>&- || { cat "$daemon_log"; return 1; }; }

if ! command -v pg_ctlcluster >/dev/null; then
    if [ "${1:-}" != "--install" ]; then
        echo "postgres: pg_ctlcluster not found (Debian's postgresql package is not installed)"; exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    echo "postgres: installing Debian's postgresql"
    # its install scripts may start a server: detached too
    detached apt-get update -q && detached apt-get install -y -q --no-install-recommends postgresql
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -1)
if ! pg_lsclusters -h | awk '{print $1 "/" $2}' | grep -qx "$version/main"; then
    detached pg_createcluster "$version" main
fi
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -qx online; then
    detached pg_ctlcluster "$version" main start
fi
port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')
as_postgres() { runuser -u postgres -- psql -p "$port" -v ON_ERROR_STOP=1 -qAt "$@"; }
for _ in $(seq 30); do as_postgres -c "select 1" >/dev/null 2>&1 && break; sleep 1; done
if [ "$(as_postgres -c "select 1 from pg_roles where rolname = 'evomerge'")" != 1 ]; then
    as_postgres -c "create role evomerge login password 'evomerge'"
fi
if [ "$(as_postgres -c "select 1 from pg_database where datname = 'evomerge'")" != 1 ]; then
    as_postgres -c "create database evomerge owner evomerge"
fi
echo "postgresql+psycopg2://evomerge:evomerge@127.0.0.1:$port/evomerge" >&3
