from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wakeaudio
from units.kws.engine import Detection, display_name, load_kws, resolve_keywords

HEADS = ["alexa_v0.1", "hey_jarvis_v0.1", "hey_mycroft_v0.1", "hey_rhasspy_v0.1"]
WAKE_WORDS = list(wakeaudio.WAKE_TEXTS)


# ---- keyword names (pure) ----

def test_display_name():
    assert display_name("hey_jarvis_v0.1") == "HEY JARVIS"
    assert display_name("alexa_v0.1") == "ALEXA"
    assert display_name("hey_rhasspy") == "HEY RHASSPY"


@pytest.mark.parametrize("text", ["hey jarvis", "HEY JARVIS", "Hey_Jarvis", "heyjarvis", "hey-jarvis",
                                  "hey_jarvis_v0.1", " hey  jarvis v0.1 "])
def test_resolve_matches_ignoring_case_spaces_underscores_versions(text):
    assert resolve_keywords(text, HEADS) == (["hey_jarvis_v0.1"], None)


def test_resolve_unknown_falls_back_with_the_spec_message():
    names, note = resolve_keywords("HELLO", HEADS)
    assert names == ["hey_jarvis_v0.1"]
    assert note == ("keyword HELLO not available, using HEY JARVIS "
                    "(available: ALEXA, HEY JARVIS, HEY MYCROFT, HEY RHASSPY)")


def test_resolve_several_words_keeps_order_and_drops_duplicates():
    assert resolve_keywords(["alexa", "hey rhasspy", "ALEXA"], HEADS) == (["alexa_v0.1", "hey_rhasspy_v0.1"], None)
    assert resolve_keywords("alexa, hey mycroft", HEADS) == (["alexa_v0.1", "hey_mycroft_v0.1"], None)


def test_resolve_partial_match_names_the_missing_word():
    names, note = resolve_keywords(["alexa", "computer"], HEADS)
    assert names == ["alexa_v0.1"]
    assert note is not None and note.startswith("keyword computer not available") and "HEY JARVIS" in note


def test_resolve_empty_request_uses_default_silently():
    assert resolve_keywords(None, HEADS) == (["hey_jarvis_v0.1"], None)
    assert resolve_keywords([], HEADS, default="alexa") == (["alexa_v0.1"], None)


def test_resolve_against_display_names():
    assert resolve_keywords("hey_rhasspy_v0.1", ["ALEXA", "HEY RHASSPY"]) == (["HEY RHASSPY"], None)


def test_resolve_default_missing_raises():
    with pytest.raises(ValueError, match="not available"):
        resolve_keywords("hello", ["alexa_v0.1"])


@settings(max_examples=200, deadline=None)
@given(head=st.sampled_from(HEADS), data=st.data())
def test_resolve_any_spelling_of_a_head_finds_it(head, data):
    words = display_name(head).split()
    seps = data.draw(st.lists(st.sampled_from([" ", "_", "-", "", "  "]), min_size=len(words), max_size=len(words)))
    text = "".join(w + s for w, s in zip(words, seps))
    text = "".join(c.upper() if data.draw(st.booleans()) else c.lower() for c in text)
    if data.draw(st.booleans()):
        text += data.draw(st.sampled_from(["_v0.1", " v2", "-v0.1.3"]))
    assert resolve_keywords(text, HEADS) == ([head], None)


# ---- loading ----

def test_manifest_heads_are_the_four_wake_words(kws_model):
    assert kws_model.keywords == ["ALEXA", "HEY JARVIS", "HEY MYCROFT", "HEY RHASSPY"]
    assert all(head.frames == 16 for head in kws_model.heads.values())


def test_folder_discovery_skips_multiclass_heads(kws_params):
    params = {k: v for k, v in kws_params.items() if k != "keyword_models"}
    model = load_kws(params)
    assert "HEY JARVIS" in model.keywords and "ALEXA" in model.keywords
    assert not any("TIMER" in k for k in model.keywords)  # timer_v0.1 scores 7 classes: not a wake word


def test_manifest_fields():
    manifest = json.loads((Path(__file__).resolve().parents[3] / "models" / "mode_openwakeword.json").read_text())
    assert manifest["type"] == "kws" and manifest["license"] == "CC BY-NC-SA 4.0"
    assert {"sherpa-onnx-kws-zipformer-gigaspeech-3.3M-2024-01-01", "kws"} <= set(manifest["aliases"])
    assert "kws.bool" in manifest["output_type"] and "sys.pcm" in manifest["input_type"]
    assert resolve_keywords(manifest["mode_param"]["kws"], HEADS) == (["hey_jarvis_v0.1"], None)


def test_detector_rejects_unknown_keyword_and_bad_values(kws_model):
    with pytest.raises(KeyError, match="available"):
        kws_model.detector(["computer"])
    with pytest.raises(ValueError):
        kws_model.detector(["alexa"], threshold=0)
    with pytest.raises(TypeError):
        kws_model.detector(["alexa"]).feed(np.zeros(1280, np.float32))
    for phases in (0, 3, 2.0, True):
        with pytest.raises(ValueError, match="phases must be 1, 2 or 4"):
            kws_model.detector(["alexa"], phases=phases)


# ---- streaming behaviour ----

def test_warm_start_gives_no_alarm_on_silence_or_low_noise(kws_model):
    det = kws_model.detector(WAKE_WORDS + ["hey mycroft"])
    rng = np.random.default_rng(3)
    assert det.feed(np.zeros(16000 * 2, np.int16)) == []
    assert det.feed(rng.normal(0, 30, 16000 * 2).astype(np.int16)) == []
    assert max(det.max_scores.values()) < 0.1


@pytest.mark.parametrize("phases", [1, 2])
def test_chunk_size_does_not_change_results(kws_model, positives, phases):
    scene = positives[0]
    whole = kws_model.detector(WAKE_WORDS, phases=phases)
    expected = whole.feed(scene.pcm)
    assert expected, "the reference scene must contain a detection"
    rng = np.random.default_rng(5)
    det = kws_model.detector(WAKE_WORDS, phases=phases)
    got: list[Detection] = []
    pos = 0
    while pos < len(scene.pcm):
        n = int(rng.choice([1, 7, 159, 160, 1279, 1280, 1281, 4000]))
        got += det.feed(scene.pcm[pos:pos + n])
        pos += n
    assert [(d.keyword, d.timestamp_ms) for d in got] == [(d.keyword, d.timestamp_ms) for d in expected]
    np.testing.assert_allclose([d.score for d in got], [d.score for d in expected], atol=1e-4)


def test_reset_restarts_clock_and_state(kws_model, positives):
    det = kws_model.detector(WAKE_WORDS)
    first = det.feed(positives[0].pcm)
    det.feed(np.zeros(5000, np.int16))
    det.reset()
    assert det.max_scores == {k: 0.0 for k in det.keywords}
    again = det.feed(positives[0].pcm)
    assert [(d.keyword, d.timestamp_ms) for d in again] == [(d.keyword, d.timestamp_ms) for d in first]


def test_refractory_period(kws_model, wake_dir):
    phrase = wakeaudio.trim(wakeaudio.synthesize("hey jarvis", "en-gb", 150, wake_dir))
    scene = wakeaudio.place([phrase, phrase], np.random.default_rng(1), gap_s=2.5)
    assert len(kws_model.detector(["hey jarvis"], refractory_ms=2000).feed(scene.pcm)) == 2
    assert len(kws_model.detector(["hey jarvis"], refractory_ms=8000).feed(scene.pcm)) == 1


# ---- accuracy on synthesized speech ----

@pytest.mark.parametrize("keyword", WAKE_WORDS)
def test_wake_words_detected(kws_model, positives, keyword):
    scenes = [s for s in positives if s.label.startswith(keyword + "|")]
    hits = 0
    for scene in scenes:
        found = kws_model.detector(WAKE_WORDS).feed(scene.pcm)
        assert all(d.keyword == keyword for d in found), (scene.label, found)
        if found:
            hits += 1
            start, end = scene.speech[0]
            t = found[0].timestamp_ms / 1000
            # A wake fires once most of the phrase is heard and soon after it ends.
            assert start + 0.2 <= t <= end + 0.6, (scene.label, t, scene.speech)
            assert 0.5 <= found[0].score <= 1.0
    assert hits >= 0.9 * len(scenes), f"{keyword}: {hits}/{len(scenes)}"


@pytest.mark.parametrize("phases", [1, 2])
def test_no_false_alarms(kws_model, negatives, phases):
    for scene in negatives:
        det = kws_model.detector(WAKE_WORDS, phases=phases)
        assert det.feed(scene.pcm) == [], scene.label


def test_flush_scores_a_wake_word_at_the_very_end_of_a_clip(kws_model, wake_dir):
    phrase = wakeaudio.trim(wakeaudio.synthesize("hey jarvis", "en-gb", 150, wake_dir))
    scene = wakeaudio.place([phrase], np.random.default_rng(2), lead_s=(1.0, 1.0), tail_s=0.0)
    det = kws_model.detector(["hey jarvis"])
    assert det.feed(scene.pcm) == []  # the heads fire only after the phrase has ended
    found = det.flush()
    assert [d.keyword for d in found] == ["HEY JARVIS"]
    assert scene.speech[0][1] <= found[0].timestamp_ms / 1000 <= scene.speech[0][1] + 0.6


def test_scores_equal_the_reference_algorithm(kws_model, positives):
    """The openwakeword library's algorithm, written out plainly with the original embedding model: per step,
    mel of the last 1760 samples, embedding of the last 76 mel frames, head on the last 16 embeddings."""
    from core.paths import resolve_pkg_url
    from core.runtime import create_session

    rng = np.random.default_rng(12)
    lead = rng.normal(0, wakeaudio.NOISE_RMS, 30 * 1280).astype(np.int16)
    scene = next(s for s in positives if s.label.startswith("ALEXA|"))
    pcm = np.concatenate((lead, scene.pcm))
    steps = len(pcm) // 1280

    det = kws_model.detector(["alexa"], threshold=1e-9, refractory_ms=0)  # every step reports its score
    got = np.array([d.score for d in det.feed(pcm)])
    assert len(got) == steps

    mel_s = create_session(resolve_pkg_url("pkg://openwakeword/resources/models/melspectrogram.onnx"), threads=1)
    emb_s = create_session(resolve_pkg_url("pkg://openwakeword/resources/models/embedding_model.onnx"), threads=1)
    head = kws_model.head_for("alexa")
    audio = np.concatenate((np.zeros(480, np.float32), pcm.astype(np.float32)))
    mel = np.concatenate([mel_s.run(None, {"input": audio[None, i * 1280:i * 1280 + 1760]})[0].reshape(8, 32)
                          for i in range(steps)]) / 10 + 2
    emb = np.stack([emb_s.run(None, {"input_1": mel[8 * k + 8 - 76:8 * k + 8][None, :, :, None]})[0].reshape(96)
                    for k in range(9, steps)])  # emb[j] belongs to step j + 9
    expected = [float(head.session.run(None, {head.input_name: emb[None, k - 9 - 15:k - 9 + 1]})[0][0, 0])
                for k in range(25, steps)]
    # Steps 25+ read only real audio (16 embeddings of 76 frames); the ones before also read the warm-up.
    np.testing.assert_allclose(got[25:], expected, atol=1e-4)
    assert max(expected) >= 0.5  # the comparison covers a detection


def test_detectors_share_one_model_across_threads(kws_model, positives):
    import threading

    scenes = positives[:6]
    expected = [kws_model.detector(WAKE_WORDS).feed(s.pcm) for s in scenes]
    results: dict[int, list[Detection]] = {}

    def work(i: int) -> None:
        det = kws_model.detector(WAKE_WORDS)
        found: list[Detection] = []
        for pos in range(0, len(scenes[i].pcm), 1600):
            found += det.feed(scenes[i].pcm[pos:pos + 1600])
        results[i] = found

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(scenes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, exp in enumerate(expected):
        assert [(d.keyword, d.timestamp_ms) for d in results[i]] == [(d.keyword, d.timestamp_ms) for d in exp]


def test_each_grid_scores_as_the_reference_pipeline_on_its_shifted_audio(kws_model, positives):
    """With 2 phases, the grid at 0 scores as one detector on the audio, the grid at 640 samples as one
    detector on the audio from sample 640 (its steps end 40 ms later)."""
    pcm = positives[0].pcm
    every = {"threshold": 1e-9, "refractory_ms": 0}  # every step reports its score
    both = kws_model.detector(["alexa"], phases=2, **every).feed(pcm)
    first = kws_model.detector(["alexa"], **every).feed(pcm)
    second = kws_model.detector(["alexa"], **every).feed(pcm[640:])
    expected = sorted([(d.timestamp_ms, d.score) for d in first] + [(d.timestamp_ms + 40, d.score) for d in second],
                      key=lambda entry: entry[0])
    assert [d.timestamp_ms for d in both] == [t for t, _ in expected]
    np.testing.assert_allclose([d.score for d in both], [score for _, score in expected], atol=1e-5)


def test_two_grids_wake_no_later_and_sooner_on_some(kws_model, positives):
    delays = []
    for scene in positives:
        one = kws_model.detector(WAKE_WORDS).feed(scene.pcm)
        two = kws_model.detector(WAKE_WORDS, phases=2).feed(scene.pcm)
        if one:
            assert two and two[0].keyword == one[0].keyword, scene.label
            assert two[0].timestamp_ms <= one[0].timestamp_ms, scene.label
            delays.append(one[0].timestamp_ms - two[0].timestamp_ms)
    assert delays and max(delays) >= 40, delays
