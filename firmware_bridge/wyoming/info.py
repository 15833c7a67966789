"""What `describe` answers: the installed models (sys.lsmode manifests) as Wyoming programs.

Built from manifests alone, so `info` lists a service whose unit is down or still loading: a request to
it then gets an `error` event saying why. Everything here is pure (no bus, no I/O).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Iterable
from urllib.parse import urlparse

from wyoming.info import (AsrModel, AsrProgram, Attribution, HandleModel, HandleProgram, Info, TtsProgram,
                          TtsVoice, WakeModel, WakeProgram)

_VERSION_SUFFIX = re.compile(r"[_-]v?\d+(\.\d+)*$")
_SEPARATORS = re.compile(r"[\s_\-]+")
_REGION = re.compile(r"^([a-z]{2})[-_]([A-Z]{2})$")
LANGUAGE_WORDS = {"english": "en", "chinese": "zh", "japanese": "ja"}


def unitbus_version() -> str:
    try:
        return metadata.version("unitbus")
    except metadata.PackageNotFoundError:
        return "0"


def word_key(text: str) -> str:
    """How wake word names compare: case, spaces, `_`, `-` and a version suffix do not matter."""
    return _SEPARATORS.sub("", _VERSION_SUFFIX.sub("", text.strip())).lower()


@dataclass(frozen=True)
class WakeWord:
    name: str  # "hey_jarvis": what clients put in `detect.names` and get back in `detection.name`
    phrase: str  # "hey jarvis"
    version: str | None  # "0.1", from the model file name
    model: str  # the kws manifest serving it


def wake_words(manifests: Iterable[dict]) -> list[WakeWord]:
    """The wake words of every kws manifest, named after their model files (hey_jarvis_v0.1.onnx)."""
    words = []
    for manifest in manifests:
        if manifest.get("type") != "kws":
            continue
        for ref in manifest.get("mode_param", {}).get("keyword_models", []) or []:
            stem = str(ref).rsplit("/", 1)[-1].removesuffix(".onnx")
            version = _VERSION_SUFFIX.search(stem)
            base = _VERSION_SUFFIX.sub("", stem)
            words.append(WakeWord(base, " ".join(p for p in _SEPARATORS.split(base) if p).lower(),
                                  version.group(0).lstrip("_-v") if version else None, manifest["mode"]))
    return words


def languages(manifest: dict, regional: bool = False) -> list[str]:
    """Language codes from a manifest's capabilities ("English" -> "en", "en-US" -> "en_US")."""
    found: list[str] = []
    for capability in manifest.get("capabilities", []):
        match = _REGION.match(str(capability))
        if match and regional:
            code = f"{match.group(1)}_{match.group(2)}"
        elif str(capability).lower() in LANGUAGE_WORDS and not regional:
            code = LANGUAGE_WORDS[str(capability).lower()]
        else:
            continue
        if code not in found:
            found.append(code)
    if regional and not found:
        return languages(manifest)
    return found or ["en"]


def attribution(manifest: dict) -> Attribution:
    """Who made the model: the owner in its homepage (huggingface.co/openai/..., github.com/dscripka/...)."""
    url = str(manifest.get("homepage") or "")
    parsed = urlparse(url)
    parts = [p for p in parsed.path.split("/") if p]
    if parsed.netloc.endswith("pypi.org") and len(parts) >= 2:
        name = parts[1]
    else:
        name = parts[0] if parts else parsed.netloc or "unitbus"
    return Attribution(name=name, url=url)


def description(manifest: dict, what: str) -> str:
    licence = manifest.get("license")
    return f"{what} ({manifest['mode']}; model licence: {licence})" if licence else f"{what} ({manifest['mode']})"


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


def model_version(manifest: dict) -> str | None:
    """The manifest's version, else that of the Python package its files come from (pkg://package/...)."""
    version = manifest.get("version") or manifest.get("details", {}).get("version")
    if version:
        return str(version)
    for value in manifest.get("mode_param", {}).values():
        if isinstance(value, str) and value.startswith("pkg://"):
            package = value[len("pkg://"):].split("/", 1)[0]
            for dist in _distributions().get(package, []):
                try:
                    return metadata.version(dist)
                except metadata.PackageNotFoundError:
                    continue
    return None


def build_info(manifests: list[dict], handle_model: str = "") -> Info:
    """One program per service (asr, tts, wake, handle), each listing the installed models."""
    version = unitbus_version()
    ours = Attribution(name="unitbus", url="")
    by_type: dict[str, list[dict]] = {}
    for manifest in manifests:
        by_type.setdefault(str(manifest.get("type")), []).append(manifest)
    info = Info()
    if by_type.get("asr"):
        info.asr.append(AsrProgram(
            name="unitbus-asr", attribution=ours, installed=True, version=version,
            description="Speech to text by the unitbus asr unit",
            models=[AsrModel(name=m["mode"], attribution=attribution(m), installed=True,
                             description=description(m, "Whisper"), version=model_version(m),
                             languages=languages(m)) for m in by_type["asr"]],
            supports_transcript_streaming=True))
    if by_type.get("tts"):
        info.tts.append(TtsProgram(
            name="unitbus-tts", attribution=ours, installed=True, version=version,
            description="Text to speech by the unitbus tts unit, spoken sentence by sentence",
            voices=[TtsVoice(name=m["mode"], attribution=attribution(m), installed=True,
                             description=description(m, "Piper voice"), version=model_version(m),
                             languages=languages(m, regional=True)) for m in by_type["tts"]],
            supports_synthesize_streaming=True))
    words = wake_words(by_type.get("kws", []))
    if words:
        kws = {m["mode"]: m for m in by_type["kws"]}
        info.wake.append(WakeProgram(
            name="unitbus-wake", attribution=ours, installed=True, version=version,
            description="Wake word detection by the unitbus kws unit",
            models=[WakeModel(name=w.name, phrase=w.phrase, attribution=attribution(kws[w.model]), installed=True,
                              description=description(kws[w.model], w.phrase), version=w.version,
                              languages=languages(kws[w.model])) for w in words]))
    llms = by_type.get("llm", [])
    if handle_model:
        llms = [m for m in llms if handle_model in (m["mode"], *m.get("aliases", []))] or llms
    if llms:
        info.handle.append(HandleProgram(
            name="unitbus-llm", attribution=ours, installed=True, version=version,
            description="A conversation agent answered by the unitbus llm unit",
            models=[HandleModel(name=m["mode"], attribution=attribution(m), installed=True,
                                description=description(m, "Language model"), version=model_version(m),
                                languages=languages(m)) for m in llms],
            supports_handled_streaming=True))
    return info
