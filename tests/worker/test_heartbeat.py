import fakeredis

from shared.config import Settings
from shared.redis_keys import RedisKeys
from shared.schemas import WorkerHeartbeat, WorkerState
from worker.heartbeat import Heartbeat

KEYS = RedisKeys("t")


def _heartbeat(client) -> Heartbeat:
    settings = Settings(key_prefix="t", heartbeat_interval_s=0.05, heartbeat_stale_s=3, _env_file=None)
    return Heartbeat(client, KEYS, settings, "w1", "some/model")


def test_a_beat_publishes_the_worker_with_a_ttl_and_joins_the_directory():
    client = fakeredis.FakeRedis(decode_responses=True)
    beat = _heartbeat(client)
    beat.current_job = "job-7"
    beat.beat()
    published = WorkerHeartbeat.model_validate(client.hgetall(KEYS.worker_heartbeat("w1")))
    assert (published.model, published.state, published.current_job) == ("some/model", WorkerState.LOADING, "job-7")
    assert published.device == "" and published.expert_offload is None  # no engine loaded yet
    assert published.system_memory_total_gb > 0
    assert 0 < client.ttl(KEYS.worker_heartbeat("w1")) <= 3
    assert client.smembers(KEYS.workers()) == {"w1"}


def test_the_thread_beats_and_runs_its_tick_until_stopped_then_leaves_the_directory():
    client = fakeredis.FakeRedis(decode_responses=True)
    beat = _heartbeat(client)
    ticks = []
    beat.on_tick = lambda: ticks.append(1)
    beat.start()
    try:
        beat.state = WorkerState.READY
        for _ in range(100):
            if len(ticks) >= 3 and client.hget(KEYS.worker_heartbeat("w1"), "state") == "ready":
                break
            beat._stop.wait(0.05)
        assert len(ticks) >= 3 and client.hget(KEYS.worker_heartbeat("w1"), "state") == "ready"
    finally:
        beat.stop()
    assert not client.exists(KEYS.worker_heartbeat("w1")) and client.smembers(KEYS.workers()) == set()
