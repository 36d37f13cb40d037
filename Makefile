# The two commands of the README: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
NODE_DIR := relaynet/test/node
DATA_DIR ?= relaynet-data
RUN_ARGS ?= --listen tcp:9090:interface=127.0.0.1 --dynamic-entities --data-dir $(DATA_DIR)

.PHONY: run test install install-test node-deps bench bench-peers bench-suite clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/pip install --quiet -e . --config-settings editable_mode=compat
	touch $@

$(VENV)/.installed-test: setup.py $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test node-deps

# The Node clients the interop tests run (hyco-ws, hyco-https).
node-deps: $(NODE_DIR)/node_modules/.installed

$(NODE_DIR)/node_modules/.installed: $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null || { echo "npm not found: installing Node.js"; \
		apt-get update -qq && apt-get install -y -qq nodejs npm; }
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: install
	$(BIN)/twistd --nodaemon --pidfile= relaynet $(RUN_ARGS)

test: install-test
	$(BIN)/python -m twisted.trial $(TRIAL_ARGS) relaynet

bench: install
	$(BIN)/python bench/run.py

# The peers of the comparison suite (crossbar, magic-wormhole-transit-relay),
# in a venv of their own; socat comes from the system.
PEERS_VENV := bench/.venv-peers

$(PEERS_VENV)/.installed: bench/peers-requirements.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip setuptools wheel
	$(PEERS_VENV)/bin/pip install --quiet -r bench/peers-requirements.txt
	touch $@

bench-peers: $(PEERS_VENV)/.installed
	@command -v socat >/dev/null || echo "socat not found: the suite skips it (apt-get install -y socat)"

# Every workload (bench/streams.py, rpc.py, pubsub.py, idle.py) against its
# peers; writes bench/RESULTS.md.  SUITE_ARGS: e.g. --quick, --only streams.
bench-suite: install bench-peers
	$(BIN)/python bench/suite.py $(SUITE_ARGS)

clean:
	rm -rf $(VENV) _trial_temp* $(NODE_DIR)/node_modules
