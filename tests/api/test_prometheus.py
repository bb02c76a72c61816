"""`GET /metrics/prometheus`: what the workers recorded in Redis, in Prometheus's text format."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.histograms import QUEUE_WAIT
from shared.schemas import GenerationOutcome
from tests.api.conftest import outcome
from worker.metrics import record_inference


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_scrape_shows_jobs_tokens_latencies_and_each_worker(client, heartbeat, sync_redis, keys):
    for prompt in ("one two", "three"):
        assert client.post("/inference", json={"prompt": prompt, "max_tokens": 5}).status_code == 200
    job_id = client.post("/inference", json={"prompt": "x"}, headers={"Prefer": "respond-async"}).json()["id"]
    sync_redis.hset(keys.job(job_id), mapping={"created_at": "100.0", "started_at": "100.3", "finished_at": "101.0"})
    record_inference(sync_redis, keys, job_id, GenerationOutcome.model_validate(outcome("x", 4)), 100.5)

    response = client.get("/metrics/prometheus")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    assert samples[("moeserve_jobs_finished_total", (("status", "succeeded"),))] == 3
    assert samples[("moeserve_jobs_finished_total", (("status", "failed"),))] == 0
    assert samples[("moeserve_queue_depth", ())] == 0
    assert samples[("moeserve_tokens_generated_total", ())] == 4  # only what record_inference saw
    # one job observed: 0.3 s in the queue, 0.7 s running, its first text 0.5 s after submission
    assert samples[("moeserve_queue_wait_seconds_count", ())] == 1
    assert samples[("moeserve_queue_wait_seconds_sum", ())] == pytest.approx(0.3)
    assert samples[("moeserve_queue_wait_seconds_bucket", (("le", "0.25"),))] == 0
    assert samples[("moeserve_queue_wait_seconds_bucket", (("le", "0.5"),))] == 1
    assert samples[("moeserve_queue_wait_seconds_bucket", (("le", "+Inf"),))] == 1
    assert samples[("moeserve_job_duration_seconds_sum", ())] == pytest.approx(0.7)
    assert samples[("moeserve_time_to_first_token_seconds_sum", ())] == pytest.approx(0.5)
    worker = (("hostname", heartbeat.snapshot().hostname), ("worker", "worker-1"))
    assert samples[("moeserve_worker_model_loaded", (*worker[:1], ("model", heartbeat.model), worker[1]))] == 1
    assert 0 <= samples[("moeserve_worker_heartbeat_age_seconds", worker)] < 60
    assert not any(name.startswith("moeserve_expert_cache") for name, _ in samples)  # no offloading worker


def test_a_queued_job_cancelled_in_place_counts_as_cancelled(client, heartbeat, celery):
    celery.hold = True
    job_id = client.post("/inference", json={"prompt": "x"}, headers={"Prefer": "respond-async"}).json()["id"]
    samples = _samples(client.get("/metrics/prometheus").text)
    assert samples[("moeserve_jobs", (("status", "queued"),))] == 0  # the held message is in no real queue
    assert client.delete(f"/jobs/{job_id}").status_code == 200
    samples = _samples(client.get("/metrics/prometheus").text)
    assert samples[("moeserve_jobs_finished_total", (("status", "cancelled"),))] == 1


def test_histogram_buckets_are_cumulative_from_the_stored_counts():
    stored = {
        QUEUE_WAIT.bucket_of(0.004): "2",
        QUEUE_WAIT.bucket_of(0.3): "1",
        QUEUE_WAIT.bucket_of(9999): "1",
        "sum": "9999.308",
    }
    buckets, total = QUEUE_WAIT.cumulative(stored)
    assert buckets[0] == ("0.005", 2) and dict(buckets)["0.5"] == 3 and buckets[-1] == ("+Inf", 4)
    assert [count for _, count in buckets] == sorted(count for _, count in buckets) and total == 9999.308
