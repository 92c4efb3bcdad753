#!/bin/bash
# HEALTHCHECK of the local registry image: GET /v2/ on port 5000 answers 200 (503 while
# the storage check fails). Plain bash (/dev/tcp): the image has no curl or wget.
set -eu
exec 3<>/dev/tcp/127.0.0.1/5000
printf 'GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
read -r -t 3 _ status _ <&3
[ "$status" = 200 ]
