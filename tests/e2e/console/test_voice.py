"""Push-to-talk in a real browser: Chromium's fake microphone plays a spoken WAV into the page; the asr unit
transcribes it, the llm answers in the chat and the tts unit's speech is played by the page."""
from __future__ import annotations

import subprocess
import time
import wave

import pytest

from consolekit import ConsoleStack, open_console, screenshot
from support import espeak_wav

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = "what is the capital of france"


@pytest.fixture(scope="module")
def voice_console(tmp_path_factory):
    console = ConsoleStack(tmp_path_factory.mktemp("voice_console"), ["llm", "asr", "tts"]).start()
    yield console
    console.stop()


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory) -> tuple[str, float]:
    folder = tmp_path_factory.mktemp("speech")
    speech = espeak_wav(QUESTION, folder / "speech.wav")
    padded = folder / "question.wav"
    subprocess.run(["sox", str(speech), str(padded), "pad", "0.3", "0.7"], check=True, capture_output=True)
    with wave.open(str(padded)) as w:
        return str(padded), w.getnframes() / w.getframerate()


def test_push_to_talk_transcript_answer_and_speech(voice_console, question_wav, browser):
    wav, seconds = question_wav
    page = browser(extra_args=["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                               f"--use-file-for-fake-audio-capture={wav}%noloop",
                               "--autoplay-policy=no-user-gesture-required"],
                   permissions=["microphone"])
    open_console(page, voice_console)
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("40")
    page.get_by_role("tab", name="Voice").click()
    # Held from the keyboard (Space on the focused button), as someone who does not use a mouse would.
    page.get_by_role("button", name="Hold to talk").focus()
    page.keyboard.down("Space")
    page.wait_for_function("() => document.querySelector('#voice-status').textContent === 'listening'")
    time.sleep(seconds + 0.3)  # hold the key while the fake microphone speaks the file
    page.keyboard.up("Space")
    turn = page.locator("#voice-log li[data-transcript]").first
    turn.wait_for(timeout=120_000)
    transcript = turn.get_attribute("data-transcript").lower()
    assert "capital" in transcript and "france" in transcript, transcript
    # The transcript went into the chat as the user's turn, and the llm answered it there.
    page.get_by_role("tab", name="Chat").click()
    assert page.locator("#messages li.user").last.locator(".content").inner_text().lower().startswith("what is the capital")
    answer = page.locator("#messages li.assistant").last
    answer.and_(page.locator("[data-finish]")).wait_for(timeout=120_000)
    text = answer.locator(".content").inner_text()
    assert "paris" in text.lower(), text
    # The answer was spoken by the tts unit and played to the end by the page's audio output.
    page.wait_for_function("() => Number(document.body.dataset.played) >= 1", timeout=120_000)
    assert float(page.evaluate("document.body.dataset.playedSeconds")) > 0.5
    page.get_by_role("tab", name="Voice").click()
    assert page.locator("#voice-status").inner_text().startswith("played")
    assert "answer:" in turn.inner_text()
    screenshot(page, "voice")
