#!/usr/bin/env bash
# What the tests need beyond the test extra's Python packages: Debian's chromium and chromium-driver,
# which the dashboard's browser test drives (it runs everywhere the tests run; it never skips).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver
