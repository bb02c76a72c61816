"""Admission: a ready fleet is trusted for FLEET_REUSE_S; a fleet with no ready worker is read again each time."""

from api.services import jobs as jobs_service
from shared.schemas import WorkerState


def test_a_worker_that_becomes_ready_is_seen_by_the_next_request(client, heartbeat, celery):
    heartbeat.state = WorkerState.LOADING
    heartbeat.beat()
    assert client.post("/inference", json={"prompt": "x"}).status_code == 503
    heartbeat.state = WorkerState.READY
    heartbeat.beat()
    assert client.post("/inference", json={"prompt": "x"}).status_code == 200  # not refused from a stale read


def test_a_ready_fleet_is_read_once_for_a_burst_of_submissions(client, heartbeat, celery, monkeypatch):
    monkeypatch.setattr(jobs_service, "FLEET_REUSE_S", 60.0)  # however slow the machine, one burst
    fleet_reader = client.app.state.jobs.fleet
    reads = []
    real_read = fleet_reader.read

    async def counted_read():
        reads.append(1)
        return await real_read()

    monkeypatch.setattr(fleet_reader, "read", counted_read)
    for _ in range(5):
        assert client.post("/inference", json={"prompt": "x"}, headers={"Prefer": "respond-async"}).status_code == 202
    assert len(reads) == 1
