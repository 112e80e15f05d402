"""platform: the course's training platform, a small distributed task-processing system.

It is an HPC or grid batch scheduler moved to Kubernetes, cut down to what an
operator must understand: clients submit tasks to an **api**, a **queue** holds
them and leases each to one **worker** at a time, workers execute them and keep
their results in a **store**. Later labs deploy it, break it on purpose (kill
pods, cut the network, overload it, ship a bad release) and measure what
happens: what is lost, what is slow, what recovers by itself, and what the logs,
traces and metrics show of it.

Run a role with ``python3 -m labkit.apps.platform ROLE`` (``api``, ``queue``,
``worker``, ``store``; or ``$ROLE``). Every role is an HTTP service on ``PORT``
with ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics``
(Prometheus), ``/version`` and ``/``; the roles' own endpoints are described in
``api``, ``taskqueue`` (the queue), ``worker`` and ``store``. Manifests for a
cluster are ``labkit/apps/manifests/platform.yaml``.

Configured through the environment (one ConfigMap serves every role):

=========================  =================================================================================
``PORT``                   port to listen on, on every address (default 8080)
``APP_VERSION``            the release (default 1.0; the image tag sets it): see below
``QUEUE_URL``              where the queue is (default ``http://queue:8080``, its Service's name)
``STORE_URL``              where the store is (default ``http://store:8080``)
``DATA_DIR``               queue and store: keep state in an append-only journal there (default: memory only)
``LEASE_SECONDS``          queue: how long a worker has to report a leased task (default 30)
``LEASE_WAIT_SECONDS``     how long a lease request waits for a task when the queue is empty (default 2, at most 30)
``MAX_ATTEMPTS``           queue: leases of a task before it is dead-lettered (default 3)
``QUEUE_LIMIT``            queue: waiting tasks beyond which submissions get 429 (default 1000)
``CONCURRENCY``            worker: tasks executed at once (default 2)
``TIMEOUT_SECONDS``        api, worker: how long a call to another service may take (default: no limit)
``RETRIES``                api, worker: retries of a failed call (default 0)
``BACKOFF_BASE``           seconds: the first retry's back-off cap, doubled each retry (default 0.1)
``BACKOFF_MAX``            seconds: the most a back-off may be (default 5)
``BREAKER_FAILURES``       api, worker: consecutive failures that open a circuit breaker (default 0: none)
``BREAKER_RESET_SECONDS``  how long a breaker stays open before a trial call (default 10)
``SHUTDOWN_DELAY``         seconds it keeps serving after SIGTERM, so endpoints update first (default 0)
=========================  =================================================================================

The resilience settings are off by default: the platform starts naive, and the
resilience lab turns on timeouts, retries with back-off, breakers one at a time
and measures each (``labkit.apps.platform.client``).

**Observability.** Every service logs JSON, one object a line on stdout: ``ts``,
``level``, ``service``, ``msg``, and, inside a request or a task, ``task_id``,
``trace_id`` and ``span_id``. A W3C ``traceparent`` sent to the api is carried
on every hop, api → queue → worker → store, and each service logs a span record
(``"msg": "span"`` with ``name``, ``trace_id``, ``span_id``, ``parent_id``,
``start``, ``duration_ms``, ``status``) for each request it serves and each
call and task it makes, so a task's trace can be put back together from the
four services' logs. ``/metrics`` has request counts and latency histograms by
route and code, calls to other services by outcome, the queue's depth, leased
and dead-lettered tasks, tasks done, failed and retried, and breaker states.

**Releases** (the image tag: ``labkit/platform:1.1``):

* ``1.0`` is correct: no task is lost when a worker is killed or drained, memory
  stays flat, failures are retried by the queue and dead-lettered after
  ``MAX_ATTEMPTS``.
* ``1.1`` acks a task as soon as it is leased, before executing it (a change
  "to save a round trip"). A graceful stop still finishes the tasks in hand, so
  rollouts and scale-downs look fine; but when a worker is killed (a crash, an
  OOM kill, ``kubectl delete pod --force --grace-period=0``) the tasks it held
  are lost for good: the load generator reports them ``lost`` (``unknown``),
  ``GET /tasks/ID`` answers 404 for them, and the queue's
  ``platform_tasks_done_total`` runs ahead of the store's
  ``platform_results_stored``.
* ``1.2`` keeps 1 MiB for ever after each task it executes (a result cache that
  is never evicted). The worker's ``process_resident_memory_bytes`` climbs with
  every task until, under a memory limit, the container is ``OOMKilled`` (exit
  137) and restarts, again and again, as a steady load goes on.
* ``1.3`` retries every failed call at once, ten times, with no timeout, no
  back-off and no breaker (its resilience settings are ignored), and retries the
  queue's 429 instead of passing it to the client. Under overload each refused
  submission becomes eleven: the queue's ``http_requests_total`` for
  ``POST /tasks`` with code 429 races ahead of the submissions, and with a slow
  or dead dependency the workers hammer it instead of backing off: a retry
  storm that makes the overload worse.
* ``1.4`` lets a failing task's error go unhandled: the worker process exits 1
  (a traceback on stderr). One ``fail`` task is a poison message: each worker
  that leases it dies, the Deployment's pods go into ``CrashLoopBackOff`` one
  after another, and only when the task's lease has run out ``MAX_ATTEMPTS``
  times is it dead-lettered and the workers recover.

Standard library only, like ``labkit.apps.web``, so the same files run as
sandbox processes and in a ``python:3.12-slim`` image.
"""

from labkit.apps.platform.settings import RELEASES, ROLES, Release, Settings

__all__ = ["RELEASES", "ROLES", "Release", "Settings"]
