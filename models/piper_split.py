"""A Piper voice cut in two at its decoder's input: the front (text encoder, duration predictor,
flow) gives the latent frames, the HiFi-GAN decoder turns frames into audio.

The decoder is about 70% of a sentence's synthesis and only looks a few frames around each output
sample, so a sentence can be decoded in pieces with some frames of context on each side and the
pieces are the whole decode's samples (to float rounding; tests/units/tts/test_tts_stream.py): the
first audio of a sentence is out after the front and one short piece, not after the whole sentence.

Built once per voice file and cached (models/cache.py); needs the onnx package (the "convert" extra).
"""
from __future__ import annotations

import logging
from pathlib import Path

from models.cache import build_once, source_stamp

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_PASS_THROUGH = ("DequantizeLinear", "QuantizeLinear")  # the int8 voice's QDQ pairs before the decoder


def decoder_input(graph) -> str:
    """The latent-frames tensor the decoder reads: what feeds /dec/conv_pre, before any QDQ pair."""
    producers = {out: node for node in graph.node for out in node.output}
    first = next((n for n in graph.node if n.name.startswith("/dec/conv_pre")), None)
    if first is None:
        raise ValueError("no Piper decoder (/dec/conv_pre) in the graph")
    tensor = first.input[0]
    while tensor in producers and producers[tensor].op_type in _PASS_THROUGH:
        tensor = producers[tensor].input[0]
    return tensor


def split_voice(model: Path, name: str) -> tuple[Path, Path, str]:
    """(front.onnx, decoder.onnx, the frames tensor's name) for the voice file `model`, cached as `name`.

    Raises ImportError without the onnx package and ValueError for a graph with no Piper decoder.
    """
    def build(folder: Path) -> None:
        import onnx
        from onnx import utils

        proto = onnx.load(str(model), load_external_data=False)
        frames = decoder_input(proto.graph)
        inputs = [i.name for i in proto.graph.input]
        outputs = [o.name for o in proto.graph.output]
        log.info("splitting the voice %s at %s (once)", model, frames)
        utils.extract_model(str(model), str(folder / "front.onnx"), inputs, [frames])
        utils.extract_model(str(model), str(folder / "decoder.onnx"), [frames], outputs)
        (folder / "frames.txt").write_text(frames, encoding="utf-8")

    from core.paths import cache_dir

    target = build_once(cache_dir() / name, source_stamp([model], FORMAT_VERSION), build,
                        ["front.onnx", "decoder.onnx", "frames.txt"])
    return target / "front.onnx", target / "decoder.onnx", (target / "frames.txt").read_text(encoding="utf-8")
