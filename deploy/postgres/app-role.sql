-- The application's database role: reads and writes rows, owns nothing.
--
-- Run once by the role that owns the schema (it runs the migrations), e.g. by docker-compose's postgres
-- service on first start (docker-entrypoint-initdb.d). psql variables: app_role, app_password.
-- Whatever the owner creates later (migrations, next months' ledger partitions) is granted the same way
-- by the default privileges below. Not granted: TRUNCATE, REFERENCES, TRIGGER, and ownership, without which
-- no ALTER TABLE ... DISABLE TRIGGER: the audit trail's append-only trigger cannot be switched off by
-- the application, and its UPDATE and DELETE are refused by that trigger.
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION', :'app_role', :'app_password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'app_role') \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'app_role') \gexec
GRANT USAGE ON SCHEMA public TO :"app_role";
REVOKE CREATE ON SCHEMA public FROM :"app_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"app_role";
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO :"app_role";
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app_role";
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO :"app_role";
