"""What operators see: /healthz, /readyz and /metrics, logs, spans, the monitor."""
