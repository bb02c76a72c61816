"""/inference's optional sampling options (top_p, stop, seed), sync and async, with the spec's defaults."""

import pytest


def test_the_defaults_stay_the_spec_s(client, heartbeat, celery):
    client.post("/inference", json={"prompt": "hi"})
    params = celery.params_of(0)
    assert (params["temperature"], params["top_p"], params["stop"], params["seed"]) == (0.7, 1.0, [], None)


@pytest.mark.parametrize("headers", [{}, {"Prefer": "respond-async"}])
def test_top_p_stop_and_seed_reach_the_worker(client, heartbeat, celery, headers):
    response = client.post(
        "/inference", headers=headers, json={"prompt": "hi", "top_p": 0.5, "stop": "END", "seed": 42}
    )
    assert response.status_code in (200, 202)
    params = celery.params_of(0)
    assert (params["top_p"], params["stop"], params["seed"]) == (0.5, ["END"], 42)


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"prompt": "x", "top_p": 1.5}, "top_p", "less than or equal to 1"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"prompt": "x", "stop": [""]}, "stop", "empty"),
        ({"prompt": "x", "seed": "7"}, "seed", "integer"),
    ],
)
def test_bad_options_get_400(client, heartbeat, celery, body, param, fragment):
    response = client.post("/inference", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"] and error["code"] == 400
    assert celery.sent == []
