"""The CPU decode benchmark's arithmetic: timings per answer, agreement with float, the ratios."""

from types import SimpleNamespace

from benchmarks.cpu_decode import _common_prefix, _report, _timed


def test_decode_speed_counts_the_tokens_after_the_first_over_the_time_after_it():
    result = _timed(started=10.0, arrivals=[10.5, 10.6, 10.7, 10.9], ended=10.9, tokens=4, text="abcd")
    assert abs(result["first_token_ms"] - 500.0) < 1e-6
    assert abs(result["decode_tok_per_s"] - 3 / 0.4) < 1e-6
    assert _timed(started=0.0, arrivals=[1.0], ended=1.0, tokens=1, text="a")["decode_tok_per_s"] is None


def test_common_prefix_counts_matching_characters():
    assert _common_prefix("hello world", "hello there") == 6
    assert _common_prefix("same", "same") == 4
    assert _common_prefix("ab", "abc") == 2


def _runs(speeds: list[float], texts: list[str]) -> list[dict]:
    return [
        {"decode_tok_per_s": s, "first_token_ms": 100.0, "text": t, "prompt": i % len(texts), "round": i // len(texts)}
        | {"peak_rss_mb": 900.0, "rss_mb": 800.0}
        for i, (s, t) in enumerate(zip(speeds, texts * (len(speeds) // len(texts)), strict=True))
    ]


def test_the_report_takes_medians_agreement_and_ratios():
    args = SimpleNamespace(threads=2, tokens=8, rounds=2)
    loads = {name: {"load_s": 1.0, "rss_mb": 500.0} for name in ("float", "fast", "llama.cpp")}
    runs = {
        "float": _runs([10.0, 12.0, 11.0, 13.0], ["one two", "three"]),
        "fast": _runs([30.0, 34.0, 32.0, 36.0], ["one two", "thr"]),
        "llama.cpp": _runs([60.0, 64.0, 62.0, 66.0], ["one too", "three"]),
    }
    prefills = {name: [{"first_token_ms": 500.0}] for name in runs}
    report = _report(args, loads, runs, prefills, {}, long_tokens=256)
    fast = report["variants"]["fast"]
    assert fast["decode_tok_per_s"] == {"median": 33.0, "min": 30.0, "max": 36.0, "n": 4}
    assert fast["prefill_tok_per_s"]["median"] == 512.0
    assert fast["agreement_with_float"]["same_text"] == 1
    assert fast["agreement_with_float"]["mean_common_prefix_chars"] == (7 + 3) / 2
    assert report["ratios"]["fast_vs_float_ratio"] == 33.0 / 11.5
    assert report["ratios"]["fast_vs_llama_cpp_ratio"] == 33.0 / 63.0
    assert report["variants"]["llama.cpp"]["agreement_with_float"]["same_text"] == 1
