from gateway.models import registry
from shoal.db import run_migrations_env

run_migrations_env(registry.metadata)
