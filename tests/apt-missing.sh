#!/usr/bin/env bash
# Install the Debian packages of the tools missing here (as root, with apt-get), or say what is missing and why.
# Usage: apt-missing.sh "WHO NEEDS" CONSEQUENCE command:package...
set -euo pipefail
who=$1 consequence=$2
shift 2
missing=""
for entry in "$@"; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "${entry%%:*}" >/dev/null || missing="$missing ${entry#*:}"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing$missing"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
else
  echo "$who$missing (sudo apt-get install$missing); $consequence."
fi
