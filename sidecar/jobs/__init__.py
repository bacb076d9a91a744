"""Offloaded work, in one package: the queue on Redis (`queue.py`, built on saq), the runner that
replays a job's request to the upstream (`runner.py`), `sidecar worker`, a process that only
runs jobs (`worker.py`), and the client's job endpoints under `jobs.path` (`api.py`). The rules
they share (ids, states, progress, lanes) are pure, in core/jobs.py; the route's side is
policies/offload.py."""
