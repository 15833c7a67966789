"""Whisper tiny.en on onnxruntime: accuracy on espeak-ng speech, silence, threads, endpointing real audio."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import asr_speech
from units.asr.endpoint import Endpointer
from units.asr.engine import FULL_WINDOW_FRAMES, load_asr


def transcribe_all(engine, items):
    return [(ref, engine.transcribe(asr_speech.read_wav(path))) for ref, path in items]


def test_word_error_rate_on_spoken_commands(asr_engine, spoken_commands):
    pairs = transcribe_all(asr_engine, spoken_commands)
    score = asr_speech.wer(pairs)
    print(f"WER {score:.3f}", *pairs, sep="\n")
    assert len(pairs) >= 10
    assert score <= 0.15, pairs


@pytest.mark.slow
def test_short_window_is_as_accurate_as_the_full_window(asr_engine, spoken_commands, tmp_path):
    """Every command in every voice (36 utterances): the short window costs at most 0.05 of WER."""
    voices = asr_speech.VOICES
    items = list(spoken_commands)
    for shift in (1, 2):
        items += asr_speech.build_set(tmp_path / str(shift), voices=voices[shift:] + voices[:shift])
    full = load_asr({"window_pad_s": 0})
    assert full.window_frames(200) == FULL_WINDOW_FRAMES
    short_wer = asr_speech.wer(transcribe_all(asr_engine, items))
    full_wer = asr_speech.wer(transcribe_all(full, items))
    print(f"WER short window {short_wer:.3f}, full window {full_wer:.3f}")
    assert short_wer <= full_wer + 0.05, (short_wer, full_wer)


def test_window_follows_the_utterance(asr_engine):
    assert asr_engine.window_frames(201) == 201 + 50 + 1  # 0.5 s of padding, rounded up to even
    assert asr_engine.window_frames(2990) == FULL_WINDOW_FRAMES
    pcm = np.zeros(16000 * 2, dtype=np.int16)
    assert asr_engine.features(pcm).shape == (1, 80, 250)
    assert asr_engine.features(np.zeros(16000 * 40, dtype=np.int16)).shape == (1, 80, FULL_WINDOW_FRAMES)


def test_silence_and_noise_give_empty_text(asr_engine):
    rng = np.random.default_rng(1)
    assert asr_engine.transcribe(np.zeros(32000, dtype=np.int16)) == ""
    assert asr_engine.transcribe((rng.standard_normal(32000) * 30).astype(np.int16)) == ""
    assert asr_engine.transcribe(np.zeros(0, dtype=np.int16)) == ""


def test_float_and_int16_input_agree(asr_engine, spoken_commands):
    pcm = asr_speech.read_wav(spoken_commands[0][1])
    assert asr_engine.transcribe(pcm.astype(np.float32) / 32768.0) == asr_engine.transcribe(pcm)


def test_model_is_shared_and_thread_safe(spoken_commands):
    loaded: dict = {}

    def share(key, loader):  # what the unit base's shared_model does
        if key not in loaded:
            loaded[key] = loader()
        return loaded[key]

    asr_engine, other = load_asr({}, share), load_asr({"max_new_tokens": 100}, share)
    assert other._m is asr_engine._m and len(loaded) == 1  # one pair of sessions per model
    files = [path for _, path in spoken_commands[:4]]
    expected = [asr_engine.transcribe(asr_speech.read_wav(p)) for p in files]
    results: dict[int, list[str]] = {}

    def worker(n, engine):
        results[n] = [engine.transcribe(asr_speech.read_wav(p)) for p in files]

    threads = [threading.Thread(target=worker, args=(n, e)) for n, e in enumerate([asr_engine, other])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {0: expected, 1: expected}


def test_endpointer_cuts_real_speech_into_utterances(asr_engine, spoken_commands):
    """Two commands with pauses, fed as 32 ms chunks through the energy VAD: one transcript each."""
    gap = np.zeros(int(1.6 * 16000), dtype=np.int16)
    (ref_a, wav_a), (ref_b, wav_b) = spoken_commands[0], spoken_commands[4]
    stream = np.concatenate([gap, asr_speech.read_wav(wav_a), gap, asr_speech.read_wav(wav_b), gap, gap])
    ep = Endpointer()
    ends = [e for e in (ep.push(stream[i:i + 512]) for i in range(0, len(stream), 512)) if e is not None]
    speech = [e for e in ends if e.has_speech]
    assert [e.rule for e in speech] == [2, 2]
    texts = [asr_engine.transcribe(e.pcm) for e in speech]
    assert asr_speech.wer([(ref_a, texts[0]), (ref_b, texts[1])]) <= 0.15, texts


def _resident_kb(mapped) -> int:
    """Resident kB of this process's mappings of a core.runtime.MappedFile (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header line: range perms offset device inode [path]
                inside = mapped.same(fields[3], fields[4])
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_token_table_pages_do_not_accumulate(asr_engine, spoken_commands):
    """The decoder gathers its token rows from the memory-mapped table: each transcription's rows are
    dropped after it, so new words do not add to what the process keeps (on kernels that cache files
    in large folios, 2 MB per new token otherwise)."""
    table = asr_engine._m.token_table[0]
    asr_engine.transcribe(asr_speech.read_wav(spoken_commands[0][1]))
    after_first = _resident_kb(table)
    for _, path in spoken_commands[1:]:
        asr_engine.transcribe(asr_speech.read_wav(path))
    assert _resident_kb(table) <= after_first + 1024
