#!/bin/sh
# Entrypoint of the local registry image, like the official `registry:2`: a *.yml/*.yaml
# file as the first argument is served (`docker-registry serve FILE`), `serve`,
# `garbage-collect` and options go to docker-registry, anything else runs as given.
# The registry logs to stderr; it is sent to stdout here (docker logs shows both anyway).
set -eu

case "${1:-}" in
    *.yml|*.yaml) set -- docker-registry serve "$@" ;;
    serve|garbage-collect|help|-*) set -- docker-registry "$@" ;;
esac

exec "$@" 2>&1
