"""For the locust web UI: `locust -f loadtests/locustfile.py` runs the SLAs of
loadtests/slas.yaml (another file: SIDECAR_LOADTEST_SLAS=path). `sidecar loadtest` is the
headless way, with the PASS/FAIL table and exit code."""

import os
from pathlib import Path

os.environ.setdefault("SIDECAR_LOADTEST_SLAS", str(Path(__file__).with_name("slas.yaml")))

from sidecar.loadtest.locustfile import *  # noqa: F403
