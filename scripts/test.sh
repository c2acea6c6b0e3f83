#!/usr/bin/env bash
# The test suite, slow end-to-end tests included: install if needed, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The report's headless-browser test (tests/harness/report/test_report.py) needs Debian's chromium;
# installed here when it is missing and we can (root with apt-get), otherwise that test skips.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/dev/null 2>&1 || echo "note: chromium could not be installed; the headless report test will skip" >&2
fi
exec .venv/bin/python -m pytest -q --durations=15 "$@"
