-- Run once by the postgres image on an empty volume (/docker-entrypoint-initdb.d): one database
-- per service, all owned by the `shoal` role the services connect as. Each service creates its
-- own tables at start (alembic migrations), so nothing else is needed here.
CREATE DATABASE shoal_segment OWNER shoal;
CREATE DATABASE shoal_template OWNER shoal;
CREATE DATABASE shoal_billing OWNER shoal;
CREATE DATABASE shoal_campaign OWNER shoal;
CREATE DATABASE shoal_execution OWNER shoal;
CREATE DATABASE shoal_gateway OWNER shoal;
