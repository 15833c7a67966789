"""The CTranslate2 -> onnxruntime converter: reading model.bin, the cache, fp32 against int8."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import asr_speech
from models import whisper_ct2

MANIFEST = Path(__file__).resolve().parents[3] / "models" / "mode_whisper-tiny.en.json"


@pytest.fixture(scope="module")
def manifest():
    return json.loads(MANIFEST.read_text())


@pytest.fixture(scope="module")
def source(manifest):
    return whisper_ct2.source_dir(manifest["mode_param"])


def test_read_ct2(source):
    w = whisper_ct2.read_ct2(source / "model.bin")
    assert len(w) == 149  # 148 variables and the tied output projection
    assert w["decoder/projection/weight"] is w["decoder/embeddings/weight"]
    assert w["encoder/layer_0/self_attention/linear_0/weight"].shape == (1152, 384)
    assert w["decoder/layer_0/attention/linear_1/weight"].dtype == np.float16
    assert whisper_ct2.model_dims(w) == {
        "d_model": 384, "n_mels": 80, "enc_heads": 6, "dec_heads": 6, "enc_layers": 4, "dec_layers": 4,
        "n_audio_ctx": 1500, "n_text_ctx": 448, "n_vocab": 51864}


def test_quantize_nbits8_roundtrip():
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    q, scales = whisper_ct2._quantize_nbits8(w)
    assert q.shape == (8, 2, 32) and q.dtype == np.uint8 and scales.shape == (16,)
    back = (q.astype(np.float32) - 128) * scales.reshape(8, 2, 1)
    np.testing.assert_allclose(back.reshape(8, 64), w, atol=float(scales.max()) / 2 + 1e-7)


def test_manifest_converts_and_cache_is_reused(manifest, source):
    out = whisper_ct2.convert_manifest(manifest)
    assert {"encoder.onnx", "encoder.onnx.data", "decoder.onnx", "decoder.onnx.data", "tokenizer.json", "config.json",
            "dims.json", "build.json"} <= {p.name for p in out.iterdir()}
    assert whisper_ct2.cache_is_current(out, source, "int8")
    assert not whisper_ct2.cache_is_current(out, source, "fp32")
    stamp = (out / "decoder.onnx").stat().st_mtime_ns
    assert whisper_ct2.convert_manifest(manifest) == out
    assert (out / "decoder.onnx").stat().st_mtime_ns == stamp


def test_failed_conversion_leaves_nothing(tmp_path, source, monkeypatch):
    def broken(*_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(whisper_ct2, "build_decoder", broken)
    with pytest.raises(RuntimeError):
        whisper_ct2.convert(source, tmp_path / "out", "int8")
    assert list(tmp_path.iterdir()) == []


def test_stale_cache_is_rebuilt(tmp_path, source):
    out = whisper_ct2.convert(source, tmp_path / "out", "fp32")
    record = json.loads((out / "build.json").read_text())
    record["sources"]["model.bin"]["sha256"] = "0" * 64  # as if built from another model.bin
    (out / "build.json").write_text(json.dumps(record))
    assert not whisper_ct2.cache_is_current(out, source, "fp32")
    whisper_ct2.convert(source, out, "fp32")
    assert whisper_ct2.cache_is_current(out, source, "fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left behind


@pytest.mark.slow
def test_int8_decoder_agrees_with_fp32(tmp_path, source, asr_engine, spoken_commands):
    from units.asr.engine import DEFAULTS, AsrEngine, load_model

    fp32 = AsrEngine(load_model(whisper_ct2.convert(source, tmp_path / "fp32", "fp32")), DEFAULTS)
    pcm = [asr_speech.read_wav(p) for _, p in spoken_commands[:6]]
    m = asr_engine._m
    feed = {"mel": asr_engine.features(pcm[0])}
    feed.update({f"tail_{k}_{i}": np.zeros((1, 6, 0, 64), np.float32) for i in range(4) for k in "kv"})
    cross = dict(zip([o.name for o in m.encoder.get_outputs()], m.encoder.run(None, feed)))
    step = {name: value for name, value in cross.items() if name.startswith("cross_")}
    step.update({f"past_{k}_{i}": np.zeros((1, 6, 0, 64), np.float32) for i in range(4) for k in "kv"})
    step.update(token=np.array([[50257]]), position=np.array([[0]]))
    a = m.decoder.run(["logits"], step)[0]
    b = fp32._m.decoder.run(["logits"], step)[0]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.995
    same = sum(asr_engine.transcribe(x) == fp32.transcribe(x) for x in pcm)
    assert same >= 5


def test_piece_table_decodes_as_the_tokenizer(manifest):
    """The engine's decoding from tokenizer.npz is the `tokenizers` library's, special tokens skipped."""
    from tokenizers import Tokenizer

    from models.bpe_tables import PieceTable

    out = whisper_ct2.convert_manifest(manifest)
    table, reference = PieceTable(out / "tokenizer.npz"), Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = ["What is the capital of France?", " naïve café, 10% off — ½ price! 東京", "<|endoftext|> hello"]
    rng = np.random.default_rng(0)
    samples = [reference.encode(t).ids for t in texts]
    samples += [rng.integers(0, 50256, 12).tolist() for _ in range(50)]  # byte pieces that split a character
    samples += [[50257, 50362, *reference.encode(" Paris.").ids, 50256]]  # Whisper's prompt and end tokens
    for ids in samples:
        assert table.decode(ids) == reference.decode(ids, skip_special_tokens=True), ids
