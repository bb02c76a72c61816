"""Choosing llama.cpp's best configuration for a card: the fastest `--n-cpu-moe` whose process fits the budget."""

from benchmarks.llama_cpp_gpu import AVX512_FLAGS, best_within_budget, cpu_backend, decode_row, prompt_rows

GIB = 1024**3


def test_the_fastest_configuration_that_fits_wins_not_the_fastest():
    rows = [
        decode_row(36, [{"samples_ts": [31.0, 30.0, 32.0]}], peak_bytes=int(15.4 * GIB), budget_gib=15.0),
        decode_row(40, [{"samples_ts": [27.0, 29.5, 28.0]}], peak_bytes=int(14.2 * GIB), budget_gib=15.0),
        decode_row(44, [{"samples_ts": [25.0, 26.0, 24.0]}], peak_bytes=int(13.0 * GIB), budget_gib=15.0),
    ]

    assert [row.within_budget for row in rows] == [False, True, True]
    assert rows[1].tokens_per_second == 28.0 and (rows[1].tokens_per_second_min, rows[1].tokens_per_second_max) == (
        27.0,
        29.5,
    )
    assert best_within_budget(rows) is rows[1]
    assert best_within_budget(rows[:1]) is None


def test_prompt_time_is_its_size_over_the_median_speed():
    rows = prompt_rows(
        40, [{"n_prompt": 2048, "samples_ts": [1000.0, 1024.0, 1100.0]}, {"n_prompt": 512, "samples_ts": [512.0]}]
    )

    assert [(row.prompt_tokens, row.seconds) for row in rows] == [(2048, 2.0), (512, 1.0)]


def test_the_avx512_cpu_backend_only_where_the_cpu_has_every_extension_it_was_built_for(tmp_path):
    (tmp_path / "avx512").mkdir()
    everything = set(AVX512_FLAGS) | {"avx2", "fma"}

    assert cpu_backend(tmp_path, everything) == tmp_path / "avx512"
    assert cpu_backend(tmp_path, everything - {"avx512_vnni"}) == tmp_path  # e.g. Skylake-SP
    assert cpu_backend(tmp_path, {"avx2", "fma", "f16c"}) == tmp_path
