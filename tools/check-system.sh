#!/usr/bin/env bash
# Checks the system programs asr-retune needs beside Python 3.11, installing the Debian
# packages when it can (root with apt-get), else stopping with what to install.
#   nginx     the canary traffic splitter (split_clients) in the embedded default
#   chromium  headless screenshots of the on-call report and plugin in the tests
#   java 17   TorchServe
set -euo pipefail
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=("nginx-light:nginx")
command -v chromium >/dev/null 2>&1 || missing+=("chromium:chromium")
if ! command -v java >/dev/null 2>&1 || ! java -version 2>&1 | grep -Eq 'version "(1[7-9]|2[0-9])'; then
  missing+=("openjdk-17-jre-headless:java 17")
fi
[ ${#missing[@]} -eq 0 ] && exit 0
pkgs=(); names=()
for m in "${missing[@]}"; do pkgs+=("${m%%:*}"); names+=("${m#*:}"); done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo ">> installing system packages: ${pkgs[*]} (for ${names[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  exit 0
fi
echo "asr-retune: missing system programs: ${names[*]}." >&2
echo "  Install them, e.g. on Debian/Ubuntu: sudo apt-get install -y ${pkgs[*]}" >&2
exit 1
