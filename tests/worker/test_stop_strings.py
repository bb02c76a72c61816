from tests.worker.conftest import RecordingControl
from worker.engine.stop_strings import StopStringControl, StopStringMatcher


def _feed(matcher: StopStringMatcher, chunks: list[str]) -> list[str]:
    return [matcher.push(chunk) for chunk in chunks]


def test_text_without_a_stop_string_passes_through():
    matcher = StopStringMatcher(["###"])
    assert _feed(matcher, ["Hello", " world"]) == ["Hello", " world"]
    assert matcher.finish() == "" and matcher.text == "Hello world" and matcher.matched is None


def test_a_possible_stop_prefix_is_held_back_until_it_is_decided():
    matcher = StopStringMatcher(["END"])
    assert _feed(matcher, ["one E", "N"]) == ["one ", ""]
    assert matcher.push("ough") == "ENough"  # not the stop string after all: released at once
    assert matcher.matched is None


def test_a_stop_string_split_over_chunks_ends_the_text_before_it():
    matcher = StopStringMatcher(["END"])
    assert _feed(matcher, ["one E", "N", "D two", " three"]) == ["one ", "", "", ""]
    assert matcher.text == "one " and matcher.matched == "END"
    assert matcher.finish() == ""


def test_the_earliest_of_several_stop_strings_wins_and_the_rest_of_the_chunk_is_dropped():
    matcher = StopStringMatcher(["\n\n", "4"])
    assert matcher.push("1, 2, 3, 4, 5\n\nmore") == "1, 2, 3, "
    assert matcher.matched == "4"


def test_held_back_text_is_released_when_generation_ends_without_the_stop():
    matcher = StopStringMatcher(["User:"])
    assert matcher.push("Goodbye. Use") == "Goodbye. "
    assert matcher.finish() == "Use"
    assert matcher.text == "Goodbye. Use"


def test_the_control_stops_generation_and_never_emits_part_of_the_stop():
    inner = RecordingControl()
    control = StopStringControl(inner, ["</s>"])
    for chunk in ["a <", "/", "s> b"]:
        control.emit(chunk)
        if control.stop_reason() is not None:
            break
    control.finish()
    assert control.stop_reason() == "stop"
    assert inner.pieces == ["a "] and control.text == "a " and control.matched == "</s>"


def test_without_stop_strings_the_control_defers_to_the_job():
    inner = RecordingControl(stop_after=1, reason="cancelled")
    control = StopStringControl(inner, [])
    assert control.stop_reason() is None
    control.emit("x")
    assert control.stop_reason() == "cancelled" and inner.pieces == ["x"]
