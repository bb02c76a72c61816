import fakeredis
import pytest

from shared.job_record import new_job_fields
from shared.redis_keys import RedisKeys
from shared.schemas import BenchmarkRequest, JobKind
from worker import benchmark_job
from worker.job_runner import JobContext


def test_percentile_is_nearest_rank():
    assert benchmark_job.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.95) == 5.0
    assert benchmark_job.percentile(list(map(float, range(1, 101))), 0.95) == 95.0


def test_memory_plan_grows_the_prompt_within_the_context():
    plan = benchmark_job.plan("memory", 4, context_length=600)
    lengths = [len(params.prompt) for params in plan]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


@pytest.mark.slow
def test_standard_benchmark_reports_the_spec_fields_on_the_real_model(engine):
    client = fakeredis.FakeRedis(decode_responses=True)
    keys = RedisKeys("b")
    client.hset(keys.job("j"), mapping=new_job_fields(JobKind.BENCHMARK, {}))
    context = JobContext(client, keys, "j", deadline=float("inf"), ttl_s=60, owner="w1", retry_s=1, stream_tokens=False)
    report, finish = benchmark_job.run(engine, BenchmarkRequest(test_type="standard", iterations=2), context)
    assert finish == "stop"
    assert report.iterations == 2 and len(report.test_prompts) == 2
    assert report.min_tokens_per_second <= report.avg_tokens_per_second <= report.max_tokens_per_second
    assert report.test_prompts[0].output_length > 0 and report.test_prompts[0].prompt_length > 5
    assert client.hget(keys.job("j"), "progress") == "2/2"
