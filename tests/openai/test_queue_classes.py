"""Interactive over batch: with the worker's own broker options, a consumer of both model queues takes every
waiting interactive message before any batch line, whatever order they were published in (real Redis)."""

from __future__ import annotations

import kombu

from services.job_messages import JobQueue, batch_queue_name
from services.settings import Settings
from worker.celery_app import broker_transport_options, celery_config
from worker.settings import WorkerSettings


def test_interactive_messages_are_consumed_before_batch_lines(fresh_redis_url: str):
    settings = WorkerSettings(redis_url=fresh_redis_url, queue_name="dgemma.order")
    producer = JobQueue(Settings(redis_url=fresh_redis_url, queue_name="dgemma.order"))
    for index in range(4):
        producer.submit(f"batch-{index}", batch=True)
    for index in range(4):
        producer.submit(f"interactive-{index}")
    producer.submit("batch-4", batch=True)
    producer.close()
    queues = [kombu.Queue(q.name, routing_key=q.routing_key) for q in celery_config(settings)["task_queues"]]
    assert [q.name for q in queues] == ["dgemma.order", batch_queue_name("dgemma.order")]
    received: list[str] = []
    with kombu.Connection(fresh_redis_url, transport_options=broker_transport_options(settings)) as connection:
        def on_message(body: object, message: kombu.Message) -> None:
            received.append(message.payload[0][0] if isinstance(message.payload, list) else str(body))
            message.ack()

        with connection.Consumer(queues[::-1], callbacks=[on_message], accept=["json"], prefetch_count=1):
            for _ in range(60):
                if len(received) == 9:
                    break
                try:
                    connection.drain_events(timeout=1)
                except TimeoutError:
                    continue
    assert received[:4] == [f"interactive-{i}" for i in range(4)]
    assert sorted(received[4:]) == [f"batch-{i}" for i in range(5)]
