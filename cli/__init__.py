"""Command-line clients of the service's HTTP API (installed as console scripts)."""
