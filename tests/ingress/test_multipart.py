"""multipart/form-data as browsers, curl and httpx (the openai SDK) write it."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from casola.ingress.multipart import MultipartError, boundary_of, parse


def _httpx_form(data: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    req = httpx.Request("POST", "http://x/", data=data, files=files)
    return req.read(), req.headers["content-type"]


def test_an_httpx_form_with_a_file_and_fields() -> None:
    audio = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"
    body, ctype = _httpx_form({"model": "whisper-1", "language": "en"}, {"file": ("a.wav", audio, "audio/wav")})
    parts = parse(body, boundary_of(ctype))
    by_name = {p.name: p for p in parts}
    assert bytes(by_name["model"].data) == b"whisper-1"
    assert bytes(by_name["language"].data) == b"en"
    f = by_name["file"]
    assert (f.filename, f.content_type, bytes(f.data)) == ("a.wav", "audio/wav", audio)
    assert isinstance(f.data, memoryview)  # a view into the body, not a copy


def test_quoted_parameters_and_repeated_fields() -> None:
    b = b"XyZ"
    body = (
        b"preamble\r\n--XyZ\r\n"
        b'Content-Disposition: form-data; name="timestamp_granularities[]"\r\n\r\nsegment\r\n'
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="timestamp_granularities[]"\r\n\r\nword\r\n'
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="file"; filename="my \\"clip\\".mp3"\r\n'
        b"Content-Type: audio/mpeg\r\n\r\nID3\x00\r\n"
        b"--XyZ--\r\nepilogue"
    )
    parts = parse(body, b)
    assert [p.name for p in parts] == ["timestamp_granularities[]", "timestamp_granularities[]", "file"]
    assert parts[2].filename == 'my "clip".mp3'
    assert bytes(parts[2].data) == b"ID3\x00"


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        ("application/json", "multipart/form-data"),
        ("multipart/form-data", "boundary"),
        ('multipart/form-data; boundary=""', "boundary"),
    ],
)
def test_bad_content_types(content_type: str, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        boundary_of(content_type)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"no boundary here", "start with the boundary"),
        (b"--B\r\nContent-Disposition: form-data; name=a\r\n\r\nunterminated", "not closed"),
        (b"--B\r\nContent-Disposition: form-data; name=a\r\nno blank line", "do not end"),
        (b"--B\r\nContent-Disposition: attachment; name=a\r\n\r\nx\r\n--B--", "form-data"),
        (b"--B\r\nContent-Type: text/plain\r\n\r\nx\r\n--B--", "without a name"),
        (b"--Bjunk\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--B--", "garbage"),
    ],
)
def test_malformed_bodies_are_refused_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        parse(body, b"B")


@given(
    st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.text(max_size=40), max_size=5),
    st.binary(max_size=2000),
)
def test_any_httpx_form_round_trips(fields: dict[str, str], audio: bytes) -> None:
    body, ctype = _httpx_form(fields, {"file": ("f.bin", audio, "application/octet-stream")})
    parts = {p.name: p for p in parse(body, boundary_of(ctype))}
    assert bytes(parts["file"].data) == audio
    for k, v in fields.items():
        assert bytes(parts[k].data).decode() == v


@given(st.binary(max_size=500))
def test_garbage_raises_only_multipart_errors(body: bytes) -> None:
    try:
        parse(body, b"B")
    except MultipartError:
        pass
