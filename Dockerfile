# The oTree Lab Manager's own image: every service of docker-compose.yml runs it (web,
# worker, bots, beat, git, caddy and the one-shot migrate), each with its own command
# (`python manage.py labservice NAME`, the same command lines as `make run`'s labserver).
#
# Built FROM the local Debian base that `manage.py build_images` (`make images`) makes, so
# no container registry is needed; where one is reachable, debian:bookworm-slim works too:
#   docker compose build --build-arg LAB_BASE_IMAGE=debian:bookworm-slim   (or set it in .env)
# It runs as root: its services hold the Docker socket (root-equivalent anyway) and the
# worker writes the instances' firewall rules (iptables, NET_ADMIN on the host's network).
ARG LAB_BASE_IMAGE=otree-lab/debian-base:bookworm
FROM ${LAB_BASE_IMAGE}

ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LAB_DATA_DIR=/var/lib/otree-lab \
    OTREE_LAB_IMAGE=manager

# python3 + venv: the manager; git: repositories and git-http-backend; iptables: the
# instances' firewall (instances/netguard.py); postgresql-client: pg_dump/psql for
# `manage.py backup_manager`/`restore_manager`.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates python3 python3-venv git iptables postgresql-client; \
    rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old; \
    python3 -m venv /opt/venv

# The pinned requirements first: this layer is rebuilt only when requirements.txt changes.
# Without the test suite's own packages (the browser driver alone is 165 MB).
COPY requirements.txt /opt/otree-lab/requirements.txt
RUN set -eux; \
    grep -vE '^(playwright|greenlet|pytest|pytest-asyncio|pytest-django|pluggy|iniconfig)==' \
        /opt/otree-lab/requirements.txt > /tmp/requirements.txt; \
    pip install --progress-bar off -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt

COPY . /opt/otree-lab
WORKDIR /opt/otree-lab
RUN python -m compileall -q manager instances lobby bots >/dev/null

ENTRYPOINT ["/opt/otree-lab/deploy/docker-entrypoint.sh"]
CMD ["python", "manage.py", "labservice", "web"]
