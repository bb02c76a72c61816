from types import SimpleNamespace

from shared.schemas import ExpertOffloadStats, WorkerState
from worker.heartbeat import Heartbeat

METRICS_FIELDS = {
    "model_loaded",
    "gpu_memory_used_gb",
    "gpu_memory_total_gb",
    "system_memory_used_gb",
    "avg_tokens_per_second",
    "total_inferences",
    "uptime_seconds",
    "expert_offload",
    "workers",
}
SPEC_HEALTH_FIELDS = {"status", "model_ready", "gpu_available", "memory_sufficient", "last_inference"}
HEALTH_FIELDS = SPEC_HEALTH_FIELDS | {"performance", "workers"}


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


def test_metrics_count_each_job_and_average_its_speed(client, heartbeat, celery):
    before = client.get("/metrics").json()
    assert set(before) == METRICS_FIELDS
    assert before["total_inferences"] == 0 and before["model_loaded"] is True
    assert before["expert_offload"] is None  # the plain engine offloads nothing
    for prompt in ("a", "a b c"):  # the echo work: 2 and 4 tokens in 0.5 s
        assert client.post("/inference", json={"prompt": prompt}).status_code == 200
    after = client.get("/metrics").json()
    assert after["total_inferences"] == 2
    assert after["avg_tokens_per_second"] == 6.0  # (4 + 8) / 2
    assert client.get("/health").json()["last_inference"] is not None


def test_dead_workers_are_pruned_from_the_directory(client, heartbeat, sync_redis, keys):
    sync_redis.delete(keys.worker_heartbeat("worker-1"))
    assert client.get("/metrics").json()["model_loaded"] is False
    assert sync_redis.smembers(keys.workers()) == set()


def test_metrics_sum_the_expert_cache_counters_of_offloading_workers(client, sync_redis, keys, settings):
    for worker_id, hits, misses in (("worker-1", 30, 10), ("worker-2", 50, 10)):
        stats = ExpertOffloadStats(
            slots_per_layer=127,
            experts_per_layer=512,
            miss_mode="hybrid",
            cpu_share=0.25,
            hits=hits,
            misses=misses,
            computed_on_host=4,
            bytes_copied=1000,
        )
        beat = Heartbeat(sync_redis, keys, settings, worker_id, "test-model")
        beat.engine = SimpleNamespace(
            device="cuda", dtype="bfloat16", context_length=4096, expert_offload_stats=lambda stats=stats: stats
        )
        beat.state = WorkerState.READY
        beat.beat()
    offload = client.get("/metrics").json()["expert_offload"]
    assert offload["hits"] == 80 and offload["misses"] == 20 and offload["hit_rate"] == 0.8
    assert offload["computed_on_host"] == 8 and offload["bytes_copied"] == 2000
    assert offload["slots_per_layer"] == 127 and offload["miss_mode"] == "hybrid"


def _recent_jobs_at(sync_redis, keys, tokens_per_second: float, ended_s_ago: float) -> None:
    import time

    sync_redis.hset(
        keys.metrics(),
        mapping={"avg_tokens_per_second": tokens_per_second, "last_inference_at": time.time() - ended_s_ago},
    )


def test_health_reports_the_recent_decode_speed_against_the_minimum(client, heartbeat, sync_redis, keys):
    idle = client.get("/health").json()["performance"]
    assert idle == {
        "meets_minimum": None,
        "recent_tokens_per_second": None,
        "min_tokens_per_second": 5.0,
        "affects_status": False,
    }  # no job yet: an idle service is not slow
    _recent_jobs_at(sync_redis, keys, tokens_per_second=3.2, ended_s_ago=5)
    response = client.get("/health")
    performance = response.json()["performance"]
    assert performance["meets_minimum"] is False and performance["recent_tokens_per_second"] == 3.2
    assert response.status_code == 200  # reported, but by default a slow worker is still healthy
    _recent_jobs_at(sync_redis, keys, tokens_per_second=3.2, ended_s_ago=3600)  # long idle since
    assert client.get("/health").json()["performance"]["meets_minimum"] is None
    _recent_jobs_at(sync_redis, keys, tokens_per_second=27.0, ended_s_ago=1)
    assert client.get("/health").json()["performance"]["meets_minimum"] is True


def test_a_slow_service_is_unhealthy_when_the_setting_says_so(client, heartbeat, sync_redis, keys, settings):
    settings.health_requires_min_speed = True
    _recent_jobs_at(sync_redis, keys, tokens_per_second=1.0, ended_s_ago=5)
    response = client.get("/health")
    assert response.status_code == 503 and response.json()["status"] == "unhealthy"
    assert response.json()["performance"]["affects_status"] is True
    _recent_jobs_at(sync_redis, keys, tokens_per_second=1.0, ended_s_ago=3600)  # idle: no verdict, healthy
    assert client.get("/health").status_code == 200


def test_health_and_metrics_list_each_fresh_worker(client, heartbeat, sync_redis, keys, settings):
    busy = Heartbeat(sync_redis, keys, settings, "worker-2", "test-model")
    busy.state, busy.current_job, busy.tokens_per_second = WorkerState.READY, "job-9", 12.5
    busy.beat()
    stale = Heartbeat(sync_redis, keys, settings, "worker-3", "test-model")
    stale.beat()
    sync_redis.hset(keys.worker_heartbeat("worker-3"), "last_heartbeat", "1000.0")
    for body in (client.get("/health").json(), client.get("/metrics").json()):
        workers = {worker["id"]: worker for worker in body["workers"]}
        assert set(workers) == {"worker-1", "worker-2"}
        assert workers["worker-2"]["current_job"] == "job-9" and workers["worker-2"]["tokens_per_second"] == 12.5
        assert workers["worker-1"]["current_job"] is None and workers["worker-1"]["tokens_per_second"] is None
        assert workers["worker-1"]["state"] == "ready" and workers["worker-1"]["hostname"]
        assert 0 <= workers["worker-1"]["heartbeat_age_s"] < 5
