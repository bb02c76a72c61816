from shared.schemas import WorkerState

METRICS_FIELDS = {"model_loaded", "gpu_memory_used_gb", "gpu_memory_total_gb", "system_memory_used_gb",
                  "avg_tokens_per_second", "total_inferences", "uptime_seconds"}
HEALTH_FIELDS = {"status", "model_ready", "gpu_available", "memory_sufficient", "last_inference"}


def test_health_is_503_without_a_worker(client):
    response = client.get("/health")
    assert response.status_code == 503
    assert set(response.json()) == HEALTH_FIELDS
    assert response.json()["model_ready"] is False


def test_health_is_200_with_a_ready_worker(client, heartbeat):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy" and body["model_ready"] is True and body["last_inference"] is None


def test_health_is_503_while_loading_and_when_the_heartbeat_is_stale(client, heartbeat, sync_redis, keys):
    heartbeat.state = WorkerState.LOADING
    heartbeat.beat()
    assert client.get("/health").status_code == 503
    heartbeat.state = WorkerState.READY
    heartbeat.beat()
    sync_redis.hset(keys.worker_heartbeat("worker-1"), "last_heartbeat", "1000.0")
    assert client.get("/health").json()["model_ready"] is False


def test_health_is_503_when_memory_is_short(client, heartbeat, settings):
    settings.min_free_memory_gb = 10_000
    body = client.get("/health").json()
    assert body["memory_sufficient"] is False and body["status"] == "unhealthy"


def test_metrics_count_each_job_and_average_its_speed(client, heartbeat, celery, sync_redis, keys):
    from shared.schemas import GenerationOutcome
    from tests.api.conftest import outcome
    from worker.metrics import record_inference

    before = client.get("/metrics").json()
    assert set(before) == METRICS_FIELDS
    assert before["total_inferences"] == 0 and before["model_loaded"] is True
    for tokens in (2, 4):
        record_inference(sync_redis, keys, GenerationOutcome.model_validate(outcome("x", tokens)))
    after = client.get("/metrics").json()
    assert after["total_inferences"] == 2
    assert after["avg_tokens_per_second"] == 6.0  # (4 + 8) / 2
    assert client.get("/health").json()["last_inference"] is not None


def test_dead_workers_are_pruned_from_the_directory(client, heartbeat, sync_redis, keys):
    sync_redis.delete(keys.worker_heartbeat("worker-1"))
    assert client.get("/metrics").json()["model_loaded"] is False
    assert sync_redis.smembers(keys.workers()) == set()
