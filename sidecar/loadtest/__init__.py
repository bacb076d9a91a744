"""`sidecar loadtest` and `sidecar record`: locust against SLAs in YAML (docs/loadtesting.md).

Nothing here is imported by the proxy: locust and its gevent patching stay in their own process.
"""
