#!/bin/sh
# docker-entrypoint-initdb.d: create the application's role (deploy/postgres/app-role.sql) on first start.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v app_role="${TOLLGATE_APP_DB_USER:-tollgate_app}" -v app_password="${TOLLGATE_APP_DB_PASSWORD:?set TOLLGATE_APP_DB_PASSWORD}" \
  -f /docker-entrypoint-initdb.d/app-role.sql.in
