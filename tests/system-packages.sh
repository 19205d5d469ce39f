#!/usr/bin/env bash
# The Debian packages the test suite runs for real, installed when missing (make test runs this
# first; so does CI through it). Nothing is installed when all are there. Needs root and apt-get
# when something is missing; otherwise it says what to install and fails.
set -euo pipefail
missing=()
# tests/test_postgres.py starts a throwaway PostgreSQL server with initdb/pg_ctl from this package.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
# tests/test_spark.py runs a local-cluster Spark (pyspark comes with the dev extras), which needs Java.
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
# tests/test_ui.py opens the Dagster UI in a headless Chromium, driven by selenium.
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
# tests/realservers.py runs nginx, apache2 and squid on 127.0.0.1 with configs of its own.
servers=()
for server in nginx apache2 squid; do
    [ -x "/usr/sbin/$server" ] || servers+=("$server")
done
missing+=("${servers[@]}")
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "the tests need these Debian packages: ${missing[*]}" >&2
    echo "install them (as root: bash tests/system-packages.sh, or apt-get install ${missing[*]})" >&2
    exit 1
fi
# The servers' packages must not start their system-wide services (ports 80 and 3128): a
# policy-rc.d that says no (exit 101) while they install, and whatever started anyway is stopped.
own_policy=
if [ ${#servers[@]} -gt 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
fi
status=0
{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } || status=$?
[ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
for server in "${servers[@]}"; do
    service "$server" stop >/dev/null 2>&1 || true
done
exit "$status"
