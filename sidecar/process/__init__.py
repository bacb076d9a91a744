"""The sidecar's processes: one worker (`worker.py`), the supervisor of several
(`supervisor.py`), the private redis-server behind `redis.url: embedded` (`embedded_redis.py`),
and what makes a child die with its parent (`parent.py`). The CLI starts them; nothing here
imports the CLI."""
