"""What operators watch: Prometheus metrics (no per-sensor label), health endpoints, logs."""
