"""A session's settings (docs/realtime.md "Session settings"): from the upgrade's params, changed by
`session.update`, every value checked and a bad one refused naming it, with nothing changed."""

from __future__ import annotations

import pytest

from casola.realtime.errors import SessionFault
from casola.realtime.settings import SessionSettings


def test_the_upgrades_params_set_the_input_and_the_vad() -> None:
    s = SessionSettings.from_params({"rate": "48000", "silence_ms": "300", "threshold": 0.6, "dialect": "native"})
    assert (s.input_format, s.input_rate, s.input_channels) == ("pcm16", 48000, 1)
    assert s.vad == {"silence_ms": 300, "threshold": 0.6}
    assert s.listen_params({"language": "en"}) == {"language": "en", "format": "pcm16", "rate": 48000,
                                                   "channels": 1, "silence_ms": 300, "threshold": 0.6}  # fmt: skip


def test_a_change_to_the_input_or_vad_reopens_the_listen_stream_and_others_do_not() -> None:
    s = SessionSettings()
    assert s.apply({"input_rate": 24000}) is True
    assert s.apply({"voice": "alloy", "instructions": "Be brief."}) is False
    assert s.apply({"silence_ms": 700}) is True
    assert (s.input_rate, s.voice, s.vad["silence_ms"]) == (24000, "alloy", 700)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"input_format": "mp3"}, "input_format"),
        ({"input_rate": 4000}, "input_rate"),
        ({"silence_ms": -1}, "silence_ms"),
        ({"threshold": 2}, "threshold"),
        ({"interrupt": "maybe"}, "interrupt"),
        ({"voice": 7}, "voice"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_a_bad_value_is_refused_naming_it_and_nothing_changes(change: dict[str, object], param: str) -> None:
    s = SessionSettings()
    with pytest.raises(SessionFault) as err:
        s.apply({"input_rate": 48000, **change})
    assert err.value.param == param
    assert s == SessionSettings()
