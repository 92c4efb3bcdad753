# oTree Lab Manager: the two commands of the README.
#   make run    set up .venv, migrate, start the whole manager (Ctrl-C stops it)
#   make test   set up .venv, run the test suite (extra pytest options: PYTEST_ARGS="-k foo -x")
#   make images build the local container images (Debian base, postgres, redis, python; the swarm
#               runtime's registry) without access to a registry, as root:
#               sudo make images [CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt]

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
CA_BUNDLE ?=

.PHONY: run test venv images check-python

run: $(STAMP)
	$(VPY) manage.py migrate --noinput
	exec $(VPY) manage.py labserver

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

venv: $(STAMP)

# The images the instances and the Docker Compose install use (existing ones are skipped;
# see README, "Container images"); CA_BUNDLE: extra CA certificates for TLS-intercepting networks.
images: $(STAMP)
	$(VPY) manage.py build_images $(if $(CA_BUNDLE),--ca-bundle $(CA_BUNDLE))

# Requirements are (re)installed only when requirements.txt is newer than the stamp.
$(STAMP): requirements.txt | $(VPY)
	$(VPY) -m pip install --quiet --disable-pip-version-check --progress-bar off -r requirements.txt
	touch $(STAMP)

$(VPY):
	@$(MAKE) --no-print-directory check-python
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

check-python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
	  echo "error: $(PYTHON) not found. Install Python 3.11 or newer:  sudo apt install python3 python3-venv"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "error: Python 3.11 or newer is needed, $(PYTHON) is $$($(PYTHON) -V 2>&1)."; \
	  echo "       Install a newer python3, or point make at one: make run PYTHON=python3.12"; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	  echo "error: $(PYTHON) cannot create virtual environments (the venv/ensurepip module is missing)."; \
	  echo "       On Debian/Ubuntu install it with:  sudo apt install python3-venv python$$v-venv"; exit 1; }
