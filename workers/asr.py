"""Speech to text with a CTranslate2 Whisper model, answering in OpenAI's audio/transcriptions shapes.

Input: the audio file as the body (WAV, raw PCM, or any container PyAV reads; its content type
in the request head). Parameters (HTTP headers `X-Casola-Param-<name>` or REQUEST params; `-` and
`_` are interchangeable):
- `response_format`: json (default) | text | srt | vtt | verbose_json;
- `language`: ISO 639-1 code (or the English name) of the speech; default: detected from the first
  30 s on multilingual models, "en" on English-only ones;
- `task`: transcribe (default) | translate (into English; multilingual models only);
- `prompt`: text that came before (style, spelling of names); the last 223 tokens are used;
- `temperature`: 0 (default: greedy/beam, falling back to 0.2 ... 1.0 when a window's output looks
  degenerate, as OpenAI's API does) or a sampling temperature up to 1 (one pass);
- `beam_size`: beams for temperature 0 (default: manifest option `beam_size`, else 5 on a GPU, 1 on a CPU);
- `timestamp_granularities` (or `timestamp_granularities[]`): "segment" decodes with timestamps;
  "word" is accepted and ignored (no word timings);
- `filename`, `format` (raw PCM sample format, e.g. s16le), `sample_rate`, `channels`: how to read
  the audio when its content type does not say.

Long audio is transcribed in consecutive 30 s windows (the input size Whisper was trained on; every
window's features are padded to 3000 frames, which real models need, see MODELS.md §1). With
timestamps the next window starts where the last complete segment ended, so no words are cut. Each
window is conditioned on the text before it (as openai/whisper does); a window that is probably
silence gives no segment. A CANCEL stops between windows. Manifest options: `beam_size`.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

import msgspec
import numpy as np

from casola.wire import Buffer, RequestMeta
from casola.wire.meta import Param
from casola.worker.call import HandlerError
from casola.worker.model import BlockingModel, Reply, param_float, param_int, param_str
from workers.audio import AudioError, load_for_asr
from workers.device import load_model
from workers.features import HOP_LENGTH, N_FRAMES_30S, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim
from workers.spec import ModelSpec

__all__ = ["FORMATS", "LANGUAGES", "Segment", "Transcript", "WhisperModel"]

FORMATS: Final = ("json", "text", "srt", "vtt", "verbose_json")
_JSON: Final = "application/json"
_TEXT: Final = "text/plain; charset=utf-8"

# Whisper's language codes and the names its verbose_json answers carry (openai/whisper tokenizer.py).
LANGUAGES: Final[dict[str, str]] = dict(
    pair.split(":")
    for pair in (
        "en:english,zh:chinese,de:german,es:spanish,ru:russian,ko:korean,fr:french,ja:japanese,pt:portuguese,"
        "tr:turkish,pl:polish,ca:catalan,nl:dutch,ar:arabic,sv:swedish,it:italian,id:indonesian,hi:hindi,"
        "fi:finnish,vi:vietnamese,he:hebrew,uk:ukrainian,el:greek,ms:malay,cs:czech,ro:romanian,da:danish,"
        "hu:hungarian,ta:tamil,no:norwegian,th:thai,ur:urdu,hr:croatian,bg:bulgarian,lt:lithuanian,la:latin,"
        "mi:maori,ml:malayalam,cy:welsh,sk:slovak,te:telugu,fa:persian,lv:latvian,bn:bengali,sr:serbian,"
        "az:azerbaijani,sl:slovenian,kn:kannada,et:estonian,mk:macedonian,br:breton,eu:basque,is:icelandic,"
        "hy:armenian,ne:nepali,mn:mongolian,bs:bosnian,kk:kazakh,sq:albanian,sw:swahili,gl:galician,mr:marathi,"
        "pa:punjabi,si:sinhala,km:khmer,sn:shona,yo:yoruba,so:somali,af:afrikaans,oc:occitan,ka:georgian,"
        "be:belarusian,tg:tajik,sd:sindhi,gu:gujarati,am:amharic,yi:yiddish,lo:lao,uz:uzbek,fo:faroese,"
        "ht:haitian creole,ps:pashto,tk:turkmen,nn:nynorsk,mt:maltese,sa:sanskrit,lb:luxembourgish,my:myanmar,"
        "bo:tibetan,tl:tagalog,mg:malagasy,as:assamese,tt:tatar,haw:hawaiian,ln:lingala,ha:hausa,ba:bashkir,"
        "jw:javanese,su:sundanese,yue:cantonese"
    ).split(",")
)
_CODES: Final = {name: code for code, name in LANGUAGES.items()}

_WINDOW_SAMPLES: Final = N_FRAMES_30S * HOP_LENGTH
_TIME_PRECISION: Final = 0.02  # seconds per timestamp token step
_FRAMES_PER_TS: Final = 2  # mel frames per timestamp step (the encoder's stride-2 conv)
_MAX_PROMPT: Final = 223  # openai/whisper: n_text_ctx // 2 - 1 tokens of previous text
_TEXT_CTX: Final = 448
# Quality gates of openai/whisper's transcribe(): a window whose text compresses too well (a loop)
# or whose tokens are too unlikely is decoded again hotter; one that is probably silence is skipped.
_FALLBACK_TEMPERATURES: Final = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_MAX_COMPRESSION: Final = 2.4
_MIN_LOGPROB: Final = -1.0
_NO_SPEECH: Final = 0.6


class Segment(msgspec.Struct):
    """One verbose_json segment; field order is OpenAI's."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class Transcript(NamedTuple):
    language: str  # ISO code
    duration: float  # seconds of audio
    segments: list[Segment]
    windows: int  # 30 s windows decoded (fewer than needed when cancelled)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments).strip()


class Options(NamedTuple):
    """One request's decoding choices, checked before any audio is decoded."""

    response_format: str
    language: str  # "" -> detect
    task: str
    prompt: str
    temperature: float
    beam_size: int
    timestamps: bool


class _Decoded(NamedTuple):
    tokens: list[int]  # without the prompt and <|endoftext|>
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float


class _Vocab:
    """The special token ids a model's tokenizer gives; read-only once built."""

    def __init__(self, tok: Any) -> None:
        def tid(t: str) -> int:
            i = tok.token_to_id(t)
            if i is None:
                raise ValueError(f"the tokenizer has no {t} token: not a Whisper tokenizer")
            return int(i)

        self.eot = tid("<|endoftext|>")
        self.sot = tid("<|startoftranscript|>")
        self.translate = tid("<|translate|>")
        self.transcribe = tid("<|transcribe|>")
        self.prev = tid("<|startofprev|>")
        self.no_timestamps = tid("<|notimestamps|>")
        # Timestamp tokens follow <|notimestamps|> in every Whisper vocabulary; some tokenizer.json
        # files (older Hugging Face exports) do not list them, so do not require the name.
        ts = tok.token_to_id("<|0.00|>")
        self.timestamp_begin = int(ts) if ts is not None else self.no_timestamps + 1
        self.languages = {
            code: i for code in LANGUAGES if (i := tok.token_to_id(f"<|{code}|>")) is not None and self.sot < i
        }


def _model_and_tokenizer(path: str, device: str, compute_type: str, threads: int) -> tuple[Any, Any]:
    import ctranslate2
    from tokenizers import Tokenizer

    model = ctranslate2.models.Whisper(path, device=device, compute_type=compute_type, intra_threads=threads)
    return model, Tokenizer.from_file(f"{path}/tokenizer.json")


class WhisperModel(BlockingModel):
    """A Whisper model served with OpenAI's transcription answers. Requests run concurrently in the
    runtime's threads: nothing per request is kept on `self`."""

    content_type = _JSON

    def __init__(self, spec: ModelSpec) -> None:
        self.name = spec.name
        self.device, self.compute_type, (self.model, self.tokenizer) = load_model(spec, _model_and_tokenizer)
        self.vocab = _Vocab(self.tokenizer)
        self.multilingual = bool(self.model.is_multilingual)
        self.n_mels = int(self.model.n_mels)
        # Beam search costs ~beam x the decoder work; on a CPU greedy is nearly as accurate (MODELS.md §4.2).
        self.beam_size = int(spec.options.get("beam_size", 5 if self.device == "cuda" else 1))

    # -- request -------------------------------------------------------------------------------

    def run_request(self, body: Buffer, meta: RequestMeta, cancelled: threading.Event) -> Reply:
        opts = self.options(meta.params)
        p = meta.params
        try:
            audio = load_for_asr(
                body,
                content_type=meta.content_type,
                filename=param_str(p, "filename"),
                pcm_format=param_str(p, "format"),
                sample_rate=param_int(p, "sample-rate"),
                channels=param_int(p, "channels", 1),
                rate=SAMPLE_RATE,
            )
        except AudioError as exc:
            raise HandlerError(str(exc), param="file") from None
        return render(self.transcribe(audio, opts, cancelled), opts)

    def options(self, params: Mapping[str, Param]) -> Options:
        """The request's parameters, checked.

        Raises:
            HandlerError: an unknown format, language or task, or an out-of-range number.
        """
        fmt = param_str(params, "response-format", "json").strip().lower() or "json"
        if fmt not in FORMATS:
            raise HandlerError(
                f"response_format must be one of {', '.join(FORMATS)}, not {fmt!r}", param="response_format"
            )
        task = param_str(params, "task", "transcribe").strip().lower() or "transcribe"
        if task not in ("transcribe", "translate"):
            raise HandlerError(f"task must be transcribe or translate, not {task!r}", param="task")
        if task == "translate" and not self.multilingual:
            raise HandlerError(f"model {self.name!r} is English-only: it cannot translate", param="task")
        temperature = param_float(params, "temperature", 0.0)
        if not 0.0 <= temperature <= 1.0:
            raise HandlerError("temperature must be between 0 and 1", param="temperature")
        beam = param_int(params, "beam-size", self.beam_size)
        if not 1 <= beam <= 16:
            raise HandlerError("beam_size must be 1..16", param="beam_size")
        grains = param_str(params, "timestamp-granularities") or param_str(params, "timestamp_granularities[]")
        timestamps = fmt in ("srt", "vtt", "verbose_json") or "segment" in grains.lower()
        return Options(
            fmt,
            self._language(param_str(params, "language")),
            task,
            param_str(params, "prompt"),
            temperature,
            beam,
            timestamps,
        )

    def _language(self, value: str) -> str:
        code = value.strip().lower()
        if not code:
            return ""
        code = _CODES.get(code, code)
        if not self.multilingual:
            if code != "en":
                raise HandlerError(f"model {self.name!r} transcribes English only, not {value!r}", param="language")
            return code
        if code not in self.vocab.languages:
            known = ", ".join(sorted(self.vocab.languages))
            raise HandlerError(f"unknown language {value!r}; model {self.name!r} knows {known}", param="language")
        return code

    # -- decoding --------------------------------------------------------------------------------

    def transcribe(self, audio: np.ndarray, opts: Options, cancelled: threading.Event) -> Transcript:
        """Decode `audio` (mono float32, 16 kHz) window by window; stops early when `cancelled` is set."""
        import ctranslate2

        total_frames = -(-len(audio) // HOP_LENGTH)
        duration = len(audio) / SAMPLE_RATE
        language = opts.language or ("" if self.multilingual else "en")
        past: list[int] = self._encode(" " + opts.prompt.strip()) if opts.prompt.strip() else []
        segments: list[Segment] = []
        seek = windows = 0
        while seek < total_frames:
            if cancelled.is_set():
                break
            size = min(N_FRAMES_30S, total_frames - seek)
            chunk = audio[seek * HOP_LENGTH : (seek + size) * HOP_LENGTH]
            feats = pad_or_trim(log_mel_spectrogram(chunk, self.n_mels), N_FRAMES_30S)[None]
            encoded = self.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)))
            if not language:  # detected once, on the first window (as openai/whisper does)
                language = self.model.detect_language(encoded)[0][0][0].strip("<|>")
            prompt = self._prompt(past, language, opts)
            d = self._decode_window(encoded, prompt, opts, cancelled)
            windows += 1
            if d.no_speech_prob > _NO_SPEECH and d.avg_logprob < _MIN_LOGPROB:
                seek += size  # silence: nothing to say, and nothing to condition the next window on
                continue
            new, advance = self._split(d, seek, size, len(segments))
            for s in new:  # the last window is padded: timestamps may point past the audio's end
                s.start = min(s.start, duration)
                s.end = max(min(s.end, duration), s.start)
            segments += new
            seek += advance
            # Condition the next window on this one's text, unless it was sampled hot (then it may be noise).
            past = [] if d.temperature > 0.5 else past + [t for s in new for t in s.tokens]
        return Transcript(language, duration, segments, windows)

    def _decode_window(self, encoded: Any, prompt: list[int], opts: Options, cancelled: threading.Event) -> _Decoded:
        """One window's tokens; at temperature 0, retried hotter while the output looks degenerate
        (up to 6 decodes, so a CANCEL also stops the retries)."""
        temps = _FALLBACK_TEMPERATURES if opts.temperature == 0 else (opts.temperature,)
        best: _Decoded | None = None
        for t in temps:
            kw: dict[str, Any] = (
                {"beam_size": opts.beam_size}
                if t == 0
                else {"beam_size": 1, "sampling_topk": 0, "sampling_temperature": t}
            )
            r = self.model.generate(
                encoded,
                [prompt],
                max_length=max(1, _TEXT_CTX - len(prompt)),
                return_scores=True,
                return_no_speech_prob=True,
                **kw,
            )[0]
            ids = [i for i in r.sequences_ids[0] if i != self.vocab.eot]
            # CTranslate2 scores are length-normalised cumulative log probs (length_penalty 1);
            # openai/whisper averages over the tokens plus the end token.
            avg = float(r.scores[0]) * len(ids) / (len(ids) + 1) if r.scores else 0.0
            text = self.tokenizer.decode([i for i in ids if i < self.vocab.eot])
            d = _Decoded(ids, avg, float(r.no_speech_prob), t, _compression_ratio(text))
            if best is None or d.avg_logprob > best.avg_logprob:
                best = d
            if d.compression_ratio <= _MAX_COMPRESSION and d.avg_logprob >= _MIN_LOGPROB:
                return d
            # Probably silence: retrying hotter would only invent words. Cancelled: the answer is dropped anyway.
            if d.no_speech_prob > _NO_SPEECH or cancelled.is_set():
                return d
        assert best is not None
        return best

    def _split(self, d: _Decoded, seek: int, size: int, first_id: int) -> tuple[list[Segment], int]:
        """openai/whisper's segmentation: consecutive timestamp tokens close one segment and open the
        next. Returns the segments and how many frames to advance: to the end of the last complete
        segment when the window ends mid-segment, else the whole window."""
        tb = self.vocab.timestamp_begin
        tokens = d.tokens
        is_ts = [t >= tb for t in tokens]
        offset = seek / 100  # mel frames are 10 ms
        cuts = [i for i in range(1, len(tokens)) if is_ts[i] and is_ts[i - 1]]
        single_ending = len(tokens) >= 2 and is_ts[-1] and not is_ts[-2]
        pieces: list[tuple[list[int], float, float]] = []
        advance = size
        if cuts:
            if single_ending:
                cuts.append(len(tokens))
            last = 0
            for cut in cuts:
                part = tokens[last:cut]
                start = offset + (part[0] - tb) * _TIME_PRECISION if part[0] >= tb else offset
                end = offset + (part[-1] - tb) * _TIME_PRECISION if part[-1] >= tb else offset + size / 100
                pieces.append((part, start, end))
                last = cut
            if not single_ending:
                advance = (tokens[last - 1] - tb) * _FRAMES_PER_TS or size  # 0 would never move on
        else:
            # No closed segment (or a model that gives no timestamps): the window's speech is one segment.
            stamps = [t for t in tokens if t >= tb]
            end = offset + size / 100
            if stamps and stamps[-1] != tb:
                end = offset + (stamps[-1] - tb) * _TIME_PRECISION
            pieces.append((tokens, offset, end))
        out: list[Segment] = []
        for part, start, end in pieces:
            text = self.tokenizer.decode([t for t in part if t < self.vocab.eot])
            if not text.strip():
                continue
            out.append(
                Segment(
                    first_id + len(out),
                    seek,
                    round(start, 3),
                    round(end, 3),
                    text,
                    part,
                    d.temperature,
                    d.avg_logprob,
                    d.compression_ratio,
                    d.no_speech_prob,
                )
            )
        return out, min(advance, size)

    def _prompt(self, past: list[int], language: str, opts: Options) -> list[int]:
        v = self.vocab
        prompt = [v.prev, *past[-_MAX_PROMPT:]] if past else []
        prompt.append(v.sot)
        if self.multilingual:
            prompt += [v.languages[language], v.translate if opts.task == "translate" else v.transcribe]
        if not opts.timestamps:
            prompt.append(v.no_timestamps)
        return prompt

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)


def _compression_ratio(text: str) -> float:
    raw = text.encode()
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


# -- answers ---------------------------------------------------------------------------------------


def render(t: Transcript, opts: Options) -> Reply:
    """The transcript in the requested response_format."""
    fmt = opts.response_format
    usage = {"type": "duration", "seconds": math.ceil(t.duration)}
    if fmt == "json":
        return Reply(_JSON, msgspec.json.encode({"text": t.text, "usage": usage}))
    if fmt == "text":
        return Reply(_TEXT, (t.text + "\n").encode())
    if fmt in ("srt", "vtt"):
        return Reply(_TEXT, _subtitles(t.segments, vtt=fmt == "vtt").encode())
    doc = {
        "task": opts.task,
        "language": LANGUAGES.get(t.language, t.language),
        "duration": round(t.duration, 3),
        "text": t.text,
        "segments": t.segments,
        "usage": usage,
    }
    return Reply(_JSON, msgspec.json.encode(doc))


def _subtitles(segments: list[Segment], *, vtt: bool) -> str:
    sep = "." if vtt else ","
    cues = []
    for n, s in enumerate(segments, 1):
        head = "" if vtt else f"{n}\n"
        cues.append(f"{head}{_clock(s.start, sep)} --> {_clock(s.end, sep)}\n{s.text.strip()}\n\n")
    return ("WEBVTT\n\n" if vtt else "") + "".join(cues)


def _clock(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"
