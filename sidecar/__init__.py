"""sidecar: a reverse-proxy sidecar driven by one YAML file."""

__version__ = "0.1.0"
