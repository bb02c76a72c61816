"""`GET /metrics/prometheus`: what the workers recorded in Redis, in Prometheus's text format."""

from prometheus_client.parser import text_string_to_metric_families

from shared.histograms import QUEUE_WAIT


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_scrape_shows_jobs_tokens_latencies_and_each_worker(client, heartbeat, celery):
    for prompt in ("one two", "three"):  # the echo work: 3 and 2 tokens
        assert client.post("/inference", json={"prompt": prompt, "max_tokens": 5}).status_code == 200
    assert client.post("/inference", json={"prompt": "four", "stream": True}).status_code == 200

    response = client.get("/metrics/prometheus")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    assert samples[("moeserve_jobs_finished_total", (("status", "succeeded"),))] == 3
    assert samples[("moeserve_jobs_finished_total", (("status", "failed"),))] == 0
    assert samples[("moeserve_queue_depth", ())] == 0
    assert samples[("moeserve_tokens_generated_total", ())] == 7
    for histogram in ("queue_wait", "job_duration"):
        assert samples[(f"moeserve_{histogram}_seconds_count", ())] == 3
        assert samples[(f"moeserve_{histogram}_seconds_bucket", (("le", "+Inf"),))] == 3
        assert 0 < samples[(f"moeserve_{histogram}_seconds_sum", ())] < 30
    assert samples[("moeserve_time_to_first_token_seconds_count", ())] == 1  # only the streamed job has a first text
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
        "0.005": "2",
        "0.5": "1",
        "+Inf": "1",
        "sum": "9999.308",
    }
    buckets, total = QUEUE_WAIT.cumulative(stored)
    assert buckets[0] == ("0.005", 2) and dict(buckets)["0.5"] == 3 and buckets[-1] == ("+Inf", 4)
    assert [count for _, count in buckets] == sorted(count for _, count in buckets) and total == 9999.308
