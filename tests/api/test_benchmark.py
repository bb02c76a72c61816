def test_benchmark_with_unknown_type_is_400(client, heartbeat):
    response = client.post("/benchmark", json={"test_type": "turbo"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "test_type"


def test_benchmark_iterations_are_bounded(client, heartbeat, settings):
    response = client.post("/benchmark", json={"iterations": settings.benchmark_max_iterations + 1})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "iterations"
    assert client.post("/benchmark", json={"iterations": 0}).status_code == 400


def test_benchmark_is_enqueued_by_name(client, heartbeat, celery):
    celery.hold = True
    response = client.post(
        "/benchmark", json={"test_type": "stress", "iterations": 2}, headers={"Prefer": "respond-async"}
    )
    assert response.status_code == 202
    name, _ = celery.sent[0]
    params = celery.params_of(0)
    assert name == "moeserve.benchmark"
    assert params == {"test_type": "stress", "iterations": 2}
