"""The broker side of dispatching: the Celery publisher and the choice of queue.

Only the dispatcher (:mod:`app.dispatcher`) calls this; a request never talks to the broker.
A message is ``slimgpt.run_job(job_id)`` with Celery task id = job id (so Flower and
``celery inspect`` show jobs by their id); it carries nothing else, never a token or the request.
The publisher builds its own Celery app from the settings and does not import the ``worker``
package (which imports torch).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Protocol

from app.core.config import Settings
from app.db.models import Job

log = logging.getLogger("slimgpt.dispatch")

TASK_NAME = "slimgpt.run_job"
#: A key the dispatcher keeps in Redis; when it is gone, so are the queued messages.
EPOCH_KEY = "slimgpt:broker-epoch"
#: No publish or broker check waits longer than this on a hung broker.
BROKER_TIMEOUT_S = 5.0


def queue_for_job(job: Job, settings: Settings) -> str:
    """The Celery queue whose workers run ``job``: the one place that decides routing.

    The worker pool (``SLIMGPT_GPU_POOLS``, see :mod:`app.routing`) with the fewest GPUs that
    meets the job's ``resources`` and, for a local model, the memory the cost model predicts.
    Submission already refused jobs that fit no pool; if the pools changed since, the job goes
    to the pool with the most GPUs rather than nowhere (its worker reports what is missing).
    """
    from app.routing import NoWorkerPool, local_config, pools_from_settings, route

    pools = pools_from_settings(settings)
    try:
        return route(job.request or {}, pools, local_config(job.local_model_path)).queue
    except NoWorkerPool as err:
        log.warning("no worker pool fits the job any more (%s); sending it to the largest",
                    err, extra={"job_id": job.id})
        return max(pools, key=lambda p: (p.gpus, p.memory_gb or 0.0)).queue


class Publisher(Protocol):
    def publish(self, job_id: str, queue: str) -> None: ...

    def broker_lost_messages(self) -> bool: ...

    def ping(self) -> bool: ...

    def reset(self) -> None: ...


class CeleryPublisher:
    """Sends ``slimgpt.run_job`` messages; every call is bounded by :data:`BROKER_TIMEOUT_S`."""

    def __init__(self, settings: Settings, celery_app: Any | None = None) -> None:
        self.settings = settings
        self._app = celery_app
        self._redis: Any | None = None

    @property
    def celery_app(self) -> Any:
        if self._app is None:
            from celery import Celery

            app = Celery("slimgpt-api", broker=self.settings.broker_url, set_as_current=False)
            transport: dict[str, Any] = {"socket_timeout": BROKER_TIMEOUT_S,
                                         "socket_connect_timeout": BROKER_TIMEOUT_S}
            if self.settings.broker_key_prefix:
                # The workers consume under the same prefix (one shared settings table).
                transport["global_keyprefix"] = self.settings.broker_key_prefix
            app.conf.update(
                task_serializer="json", accept_content=["json"],
                broker_connection_retry_on_startup=False,
                broker_connection_timeout=BROKER_TIMEOUT_S,
                broker_transport_options=transport,
                # Flower/events show a job from the moment it is sent.
                task_send_sent_event=True,
            )
            self._app = app
        return self._app

    def publish(self, job_id: str, queue: str) -> None:
        # retry=False: a dead broker fails this pass at once; the dispatcher tries again later.
        self.celery_app.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=queue,
                                  retry=False)

    def reset(self) -> None:
        """Drop the connections after a broker error; the next call opens fresh ones."""
        app, self._app = self._app, None
        if app is not None:
            try:
                app.close()
            except Exception:
                log.debug("closing the broker connection failed", exc_info=True)

    def _redis_client(self) -> Any | None:
        url = str(self.settings.broker_url)
        if not url.startswith(("redis://", "rediss://")):
            return None
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        return self._redis

    def broker_lost_messages(self) -> bool:
        """True when the broker's data set was lost since the last call (Redis restarted without
        persistence, or flushed): the epoch key is gone. Also True on a brand-new broker."""
        client = self._redis_client()
        if client is None:
            return False
        key = f"{self.settings.broker_key_prefix}{EPOCH_KEY}"
        return bool(client.set(key, uuid.uuid4().hex, nx=True))

    def ping(self) -> bool:
        """The broker answers (used by /readyz)."""
        client = self._redis_client()
        if client is not None:
            return bool(client.ping())
        with self.celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
