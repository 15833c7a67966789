"""The Piper voice engine: audio plausibility, speed, fallback, awkward text, phoneme layout."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from units.tts import engine
from units.tts.engine import load_tts

SENTENCE = "The weather is sunny and warm this afternoon."


def seconds(pcm: np.ndarray, rate: int = 16000) -> float:
    return len(pcm) / rate


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if pcm.size else 0.0


def assert_speech(pcm: np.ndarray, words: int) -> None:
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    assert 0.15 * words <= seconds(pcm) <= 1.5 * words + 0.5, f"{seconds(pcm):.2f} s for {words} words"
    assert rms(pcm) > 1000, "audio is (nearly) silent"
    # Speech has pauses and louder stretches: 20 ms frame energies must vary a lot.
    frames = pcm[: len(pcm) // 320 * 320].reshape(-1, 320).astype(np.float64)
    energy = np.sqrt((frames ** 2).mean(axis=1))
    assert energy.max() > 10 * max(np.percentile(energy, 5), 1.0)


def test_sentence_has_plausible_duration_and_is_not_silent(tts_voice):
    pcm = tts_voice.synthesize(SENTENCE)
    assert_speech(pcm, len(SENTENCE.split()))
    assert np.abs(pcm).max() < 32767  # normalised with headroom, not clipped


def test_faster_speed_gives_shorter_audio(tts_voice):
    normal = tts_voice.synthesize(SENTENCE, speed=1.0)
    fast = tts_voice.synthesize(SENTENCE, speed=2.0)
    slow = tts_voice.synthesize(SENTENCE, speed=0.5)
    assert seconds(fast) < 0.8 * seconds(normal)
    assert seconds(slow) > 1.4 * seconds(normal)


@pytest.mark.parametrize("speed", [0, -1, 0.01, 100, float("nan"), float("inf")])
def test_bad_speed_is_refused(tts_voice, speed):
    with pytest.raises(ValueError):
        tts_voice.synthesize("hello", speed=speed)


def test_native_rate_variant(tts_voice, monkeypatch):
    monkeypatch.setattr(tts_voice, "noise_w", 0.0)  # phoneme durations without noise: both lengths comparable
    native = tts_voice.synthesize_native("Hello there.")
    assert tts_voice.native_rate == 22050
    assert native.dtype == np.float32 and np.abs(native).max() <= 1.0
    assert 0.3 < len(native) / 22050 < 3.0
    assert abs(len(tts_voice.synthesize("Hello there.", rate=22050)) - len(native)) < 0.1 * len(native)


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "...", "?!", "\x00"])
def test_nothing_to_say_gives_empty_audio(tts_voice, text):
    pcm = tts_voice.synthesize(text)
    assert pcm.dtype == np.int16 and pcm.size == 0


@pytest.mark.parametrize("text", [
    '"Quoted," she said. \'Single\' quotes too.',
    "-v en-gb --stdout",
    "--help",
    "Café, naïve façade; Zürich — déjà vu.",
    "I love pizza 🍕 and 😀!",
    "日本語のテキスト。中文，句子！",
    "$(rm -rf /); `echo hi` | cat > /tmp/x && echo $HOME",
    "<speak>not ssml</speak> & 5 < 6",
    "a\x00b\x07c\rd",
])
def test_awkward_text_does_not_crash(tts_voice, text):
    pcm = tts_voice.synthesize(text)
    assert pcm.dtype == np.int16
    assert pcm.size > 1600 and rms(pcm) > 300


def test_leading_dash_is_spoken_not_parsed_as_an_option(tts_voice):
    phonemes = ["".join(s) for s in tts_voice.phonemize("--version")]
    assert phonemes and "vˈɜːʒən" in unicodedata.normalize("NFC", phonemes[0])


def test_phonemes_follow_piper_punctuation_rules(tts_voice):
    sentences = tts_voice.phonemize("Hello, world. How are you? Fine; thanks")
    assert len(sentences) == 3
    first, second, third = ("".join(s) for s in sentences)
    assert first.endswith(".") and ", " in first
    assert second.endswith("?")
    assert "; " in third and third.endswith(".")
    for s in sentences:
        assert all(len(p) == 1 for p in s)
        assert unicodedata.is_normalized("NFD", "".join(s))


def test_decimal_numbers_and_abbreviations_stay_in_one_sentence(tts_voice):
    assert len(tts_voice.phonemize("It costs 3.5 dollars, e.g. at Dr. Smith's shop.")) == 1


def test_phoneme_ids_use_piper_layout(tts_voice):
    id_map = tts_voice.model.id_map
    ids = tts_voice.model.ids(list("hə,"))
    pad = id_map["_"]
    assert ids == id_map["^"] + pad + id_map["h"] + pad + id_map["ə"] + pad + id_map[","] + pad + id_map["$"]
    assert tts_voice.model.ids(["\u2603"]) == id_map["^"] + pad + id_map["$"]  # unknown symbols dropped


def test_long_text_is_synthesised_sentence_by_sentence(tts_voice):
    text = "First sentence here. Second one follows! Is this the third?"
    parts = list(tts_voice.iter_synthesize(text))
    # The first sentence comes in growing chunks (its first audio early), the later ones whole.
    first = engine.FIRST_FRAMES * tts_voice.model.hop * 16000 // tts_voice.native_rate
    assert abs(parts[0].size - first) < 400 and len(parts) >= 4
    assert all(p.dtype == np.int16 for p in parts) and all(p.size > 1600 for p in parts[:-1])


def test_overlong_sentences_are_cut_at_word_gaps():
    phonemes = list("ab cd ef gh")
    pieces = engine._pieces(phonemes, limit=5)
    assert ["".join(p) for p in pieces] == ["ab ", "cd ", "ef gh"]
    assert sum(len(p) for p in engine._pieces(list("x" * 23), limit=5)) == 23


@pytest.mark.slow
def test_run_on_text_longer_than_one_piece(tts_voice):
    text = ", ".join(["and then we walked a little further down the road"] * 12)
    assert sum(len(s) for s in tts_voice.phonemize(text)) > engine.MAX_PHONEMES
    parts = list(tts_voice.iter_synthesize(text))
    assert len(parts) >= 2
    assert_speech(np.concatenate(parts), len(text.split()))


def one_per_key():
    """A share function like the unit base's shared_model, with the dict it fills."""
    loaded: dict = {}

    def share(key, loader):
        if key not in loaded:
            loaded[key] = loader()
        return loaded[key]
    return share, loaded


def test_voices_share_one_session():
    share, loaded = one_per_key()
    first, again = load_tts({}, share), load_tts({"noise_scale": 0.5}, share)
    assert again.model is first.model and len(loaded) == 1
    assert again.noise_scale == 0.5 and first.noise_scale == pytest.approx(0.667)
    assert load_tts({}).model is not first.model  # without a share function each load is its own


def test_fallback_voice_when_the_voice_file_is_missing(espeak_voice):
    assert espeak_voice.backend == "espeak"
    assert_speech(espeak_voice.synthesize(SENTENCE), len(SENTENCE.split()))
    assert seconds(espeak_voice.synthesize(SENTENCE, speed=2.0)) < 0.8 * seconds(espeak_voice.synthesize(SENTENCE))
    assert espeak_voice.synthesize("").size == 0
    assert espeak_voice.synthesize("--help").size > 1600


def test_fallback_voice_when_onnxruntime_cannot_load_the_file(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not an onnx model")
    (tmp_path / "broken.onnx.json").write_text(json.dumps({
        "audio": {"sample_rate": 22050}, "phoneme_id_map": {"_": [0], "^": [1], "$": [2]},
    }))
    voice = load_tts({"voice": str(broken)})
    assert voice.backend == "espeak"
    assert rms(voice.synthesize("Hello there.")) > 1000


def test_missing_espeak_program_is_an_error():
    with pytest.raises(engine.TtsError):
        load_tts({"espeak_program": "espeak-ng-does-not-exist"})


def test_manifest_parameters_load_the_same_voice():
    manifest = json.loads((Path(engine.__file__).parents[2] / "models" / "mode_piper-en-us-joe-medium.json").read_text())
    assert manifest["type"] == "tts" and "single-speaker-english-fast" in manifest["aliases"]
    share, loaded = one_per_key()
    default = load_tts({"mode": "piper-en-us-joe-medium"}, share)
    voice = load_tts({**manifest["mode_param"], "mode": manifest["mode"]}, share)
    assert voice.backend == "piper" and voice.model is default.model and len(loaded) == 1
