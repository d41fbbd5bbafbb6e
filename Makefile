# Cyberdesk: the two commands a newcomer needs are `make run` and `make test`.
# Every target that needs the toolchain depends on `setup`, which is quick when nothing changed.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
TS := sdk/typescript
NPM_STAMP := $(TS)/node_modules/.setup-stamp
CONSOLE := console
CONSOLE_NPM_STAMP := $(CONSOLE)/node_modules/.setup-stamp
CONSOLE_DIST := $(CONSOLE)/dist/index.html
WEB_STAMP := web/node_modules/.setup-stamp
AGAINST ?= HEAD~1
PYTEST_ARGS ?=
# Test processes (pytest-xdist; 0 runs in one process). Each test file stays in one process
# (--dist loadfile), so a module's stack is started once and tests that share fixed test
# addresses (the egress hosts) never run at the same time.
PYTEST_WORKERS ?= 2

.PHONY: setup system proto proto-check lint format test run bench breaking clean console

setup: system $(STAMP) $(NPM_STAMP) $(WEB_STAMP) $(CONSOLE_DIST)

# Debian packages the stack runs: bubblewrap (sandboxes), redis-server, and for desktops Xvfb, xdotool,
# a small window manager (matchbox) and xdpyinfo (x11-utils); for INTERNET instances slirp4netns
# (user-mode networking), nft (nftables: egress rules inside each instance's network namespace) and
# ip (iproute2); mkfs.ext4 (e2fsprogs) for the file system that bounds each instance's disk; chromium, the
# headless browser the TypeScript SDK's browser test drives (playwright-core, with no browser download).
# The validators of tests/k8s/manifests: kubectl (kubectl kustomize k8s/), systemd-analyze (verify of the
# guest image's units), cloud-init (`cloud-init schema` of its cloud-configs; about 3 MB with its Python
# deps, kept from ever running at this machine's boot by /etc/cloud/cloud-init.disabled) and shellcheck;
# x11vnc, the VNC server of a desktop instance that the live desktop viewer streams (guest_agent/vnc.py).
system:
	@missing=""; \
	for pair in bwrap:bubblewrap redis-server:redis-server Xvfb:xvfb xdotool:xdotool \
	    matchbox-window-manager:matchbox-window-manager xdpyinfo:x11-utils zstd:zstd \
	    slirp4netns:slirp4netns nft:nftables ip:iproute2 mkfs.ext4:e2fsprogs chromium:chromium \
	    kubectl:kubernetes-client systemd-analyze:systemd cloud-init:cloud-init shellcheck:shellcheck x11vnc:x11vnc; do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "missing system packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi; \
	if [ -x /usr/bin/cloud-init ] && [ ! -e /etc/cloud/cloud-init.disabled ] && [ "$$(id -u)" = 0 ]; then \
	  touch /etc/cloud/cloud-init.disabled; \
	fi

# Both distributions, editable: the SDK (sdk/python: cyberdesk + cyberdesk_proto) and the servers (.)
$(STAMP): pyproject.toml sdk/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip uninstall -q -y cyberdesk cyberdesk-server >/dev/null 2>&1 || true
	$(PY) -m pip install -q -e ./sdk/python -e '.[dev]'
	touch $@

# The TypeScript SDK's tools (typescript, openapi-typescript) and its one Node runtime dependency (ws),
# exactly as locked; again only when the lockfile changed. Node 20+ is needed (fs.openAsBlob, AbortSignal.any).
$(NPM_STAMP): $(TS)/package.json $(TS)/package-lock.json
	@node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' 2>/dev/null || { echo "Node.js 20 or newer is needed for sdk/typescript"; exit 1; }
	cd $(TS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The live desktop viewer's one browser dependency, noVNC (web/package.json), exactly as locked.
$(WEB_STAMP): web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The web console's build tools (esbuild, xterm.js, typescript; the SDK by a file: link), as locked.
$(CONSOLE_NPM_STAMP): $(CONSOLE)/package.json $(CONSOLE)/package-lock.json
	cd $(CONSOLE) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The console's bundle in console/dist (served by the gateway at /; built here, never committed),
# rebuilt when its sources or the SDK's change: esbuild takes about a second.
$(CONSOLE_DIST): $(CONSOLE_NPM_STAMP) $(CONSOLE)/build.mjs $(CONSOLE)/tsconfig.json $(shell find $(CONSOLE)/src $(TS)/src -type f 2>/dev/null)
	cd $(CONSOLE) && node build.mjs

console: $(CONSOLE_DIST)

proto: setup
	$(PY) tools/gen_proto.py
	$(PY) tools/gen_openapi.py
	cd $(TS) && node scripts/gen.mjs
	$(BIN)/buf format -w
	$(BIN)/buf lint

proto-check: setup
	$(BIN)/buf lint
	$(BIN)/buf format --exit-code --diff >/dev/null || { echo "buf format would change proto/; run make proto"; exit 1; }
	$(PY) tools/gen_proto.py --check
	$(PY) tools/gen_openapi.py --check
	cd $(TS) && node scripts/gen.mjs --check
	$(PY) tools/unasync.py --check

lint: proto-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd $(TS) && node_modules/.bin/tsc --noEmit -p tsconfig.json
	cd $(CONSOLE) && node_modules/.bin/tsc --noEmit -p tsconfig.json

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/buf format -w

test: proto-check
	@# A short base for tmp_path: an agent's socket (<tmp>/state/instances/<sandbox>/sock/agent.sock)
	@# must fit a unix socket's 107 bytes, and xdist adds popen-gwN/ to pytest's default base.
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile --basetemp="$$(mktemp -d /tmp/cdtXXXXXX)" $(PYTEST_ARGS)

# Wire-incompatible changes of the API against a git ref (default: the previous commit).
breaking: setup
	@# buf clones the ref; a short or symbolic ref is resolved to a full commit first.
	$(BIN)/buf breaking --against ".git#ref=$$(git rev-parse --verify '$(AGAINST)^{commit}'),depth=1000"

run: setup
	$(BIN)/cyberdesk up

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build sdk/python/build *.egg-info
