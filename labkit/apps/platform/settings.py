"""The platform's settings and releases: one environment (one ConfigMap) configures every role.

Each role reads only what concerns it, so the same ConfigMap can be given to all
four Deployments with ``envFrom``. A bad value stops the process with a message
a trainee can act on, as a misconfigured pod's log would say.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from labkit.apps import DEFAULT_RELEASE, PLATFORM_RELEASES

ROLES = ("api", "queue", "worker", "store")
MIB = 1 << 20


@dataclass(frozen=True)
class Release:
    """What a release does differently from the correct 1.0 (the module docstring tells the story)."""

    summary: str
    ack_first: bool = False  # the worker acks a task as soon as it leases it
    leak_per_task: int = 0  # bytes the worker keeps for ever after each task
    retry_storm: bool = False  # calls retried at once, many times, no timeout, back-off or breaker
    crash_on_failure: bool = False  # a task that fails ends the worker process


RELEASES: dict[str, Release] = {
    "1.0": Release("correct"),
    "1.1": Release("the worker acks a task when it leases it, before executing it", ack_first=True),
    "1.2": Release("the worker keeps 1 MiB for ever after each task it executes", leak_per_task=MIB),
    "1.3": Release("the api and the worker retry every failed call at once, up to 10 times, without a "
                   "timeout, back-off or breaker, and retry the queue's 429 instead of passing it on",
                   retry_storm=True),  # fmt: skip
    "1.4": Release("a task that fails ends the worker process with an unhandled error", crash_on_failure=True),
}
assert tuple(RELEASES) == PLATFORM_RELEASES, "labkit.apps.PLATFORM_RELEASES lists the releases published"
STORM_RETRIES = 10  # what release 1.3 retries every failed call
MAX_LEASE_WAIT = 30.0  # seconds a lease request may wait for a task


@dataclass(frozen=True)
class Settings:
    """What the environment asks of this process (see the package docstring for each variable)."""

    role: str
    port: int = 8080
    version: str = DEFAULT_RELEASE
    hostname: str = "localhost"
    queue_url: str = "http://queue:8080"
    store_url: str = "http://store:8080"
    data_dir: Path | None = None
    lease_seconds: float = 30.0
    lease_wait: float = 2.0
    max_attempts: int = 3
    queue_limit: int = 1000
    concurrency: int = 2
    timeout: float | None = None  # None: calls wait as long as the other side takes
    retries: int = 0
    backoff_base: float = 0.1
    backoff_max: float = 5.0
    breaker_failures: int = 0  # 0: no circuit breaker
    breaker_reset: float = 10.0
    shutdown_delay: float = 0.0

    @property
    def release(self) -> Release:
        """The behaviour of this release; a tag the catalog does not publish behaves as 1.0."""
        return RELEASES.get(self.version, RELEASES[DEFAULT_RELEASE])

    @classmethod
    def from_env(cls, role: str, env: Mapping[str, str] = os.environ) -> Settings:
        data_dir = env.get("DATA_DIR", "").strip()
        timeout = _number(env, "TIMEOUT_SECONDS", 0.0)
        return cls(
            role=role,
            port=int(_number(env, "PORT", 8080)),
            version=env.get("APP_VERSION") or DEFAULT_RELEASE,
            hostname=env.get("HOSTNAME") or socket.gethostname(),
            queue_url=(env.get("QUEUE_URL") or "http://queue:8080").rstrip("/"),
            store_url=(env.get("STORE_URL") or "http://store:8080").rstrip("/"),
            data_dir=Path(data_dir) if data_dir else None,
            lease_seconds=_number(env, "LEASE_SECONDS", 30.0, low=0.05),
            lease_wait=_number(env, "LEASE_WAIT_SECONDS", 2.0, high=MAX_LEASE_WAIT),
            max_attempts=int(_number(env, "MAX_ATTEMPTS", 3, low=1)),
            queue_limit=int(_number(env, "QUEUE_LIMIT", 1000, low=1)),
            concurrency=int(_number(env, "CONCURRENCY", 2, low=1)),
            timeout=timeout or None,
            retries=int(_number(env, "RETRIES", 0)),
            backoff_base=_number(env, "BACKOFF_BASE", 0.1),
            backoff_max=_number(env, "BACKOFF_MAX", 5.0),
            breaker_failures=int(_number(env, "BREAKER_FAILURES", 0)),
            breaker_reset=_number(env, "BREAKER_RESET_SECONDS", 10.0),
            shutdown_delay=_number(env, "SHUTDOWN_DELAY", 0.0),
        )


def _number(env: Mapping[str, str], name: str, default: float, low: float = 0.0, high: float | None = None) -> float:
    """A numeric setting; an empty one is the default (a ConfigMap key left blank)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"platform: ${name} must be a number, got {raw!r}") from None
    if value < low:
        raise SystemExit(f"platform: ${name} must be at least {low:g}, got {raw!r}")
    if high is not None and value > high:
        raise SystemExit(f"platform: ${name} must be at most {high:g}, got {raw!r}")
    return value
