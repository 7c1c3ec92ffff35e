"""Shoal's shared kit: config, telemetry, gRPC server/client, bus, db, errors."""
