#!/bin/bash
# Installs the Debian packages the benchmark needs (given as arguments) when
# they are missing. Idempotent and silent when everything is installed.
#
#   bash bench/install-deps.sh postfix time procps
#
# postfix is pre-seeded with "No configuration" (bench/run.sh installs its own
# main.cf/master.cf when it needs Postfix) and must not be left running: if the
# package start-up script started it, it is stopped again.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 PACKAGE..." >&2
    exit 2
fi

missing=()
for p in "$@"; do
    if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed'; then
        missing+=("$p")
    fi
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "bench: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
    exit 1
fi

installing_postfix=0
for p in "${missing[@]}"; do
    if [ "$p" = postfix ]; then
        installing_postfix=1
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        echo "postfix postfix/mailname string bench.test" | debconf-set-selections
    fi
done

echo "bench: installing missing Debian packages: ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null

# The package may have started Postfix; the benchmark starts it itself, with
# its own configuration, only while it measures it.
if [ "$installing_postfix" -eq 1 ] && postfix status >/dev/null 2>&1; then
    echo "bench: stopping the Postfix instance started by the package"
    postfix stop >/dev/null 2>&1 || true
fi
exit 0
