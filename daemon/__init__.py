"""vlmd's service: config, MQTT wiring, scheduling, worker, systemd, CLI."""
