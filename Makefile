# Two entry points: `make demo` (the main job) and `make test` (the tests).
# Both create .venv on first use and reuse it afterwards.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench proto venv clean

# buf (the protobuf linter) for tests/device/test_proto.py's `buf lint`, from the npm registry, pinned
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) (onnxruntime-training has no wheels beyond 3.11)"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m edgeblock.demo

$(BUF):
	@command -v npm >/dev/null 2>&1 && npm install --prefix .tools --no-save --silent --no-audit --no-fund \
		@bufbuild/buf@$(BUF_VERSION) || echo "npm could not install buf: the buf lint test will say so"

test: $(STAMP) $(BUF)
	$(BIN)/python -m pytest -q -x tests

bench: $(STAMP)
	$(BIN)/edgeblock bench memory --json

# Regenerate the gRPC stubs (edge_runtime/api/) and docs/api.md from proto/edgeblock/v1/edgeblock.proto.
proto: $(STAMP)
	$(BIN)/python -m edge_runtime.api.generate

clean:
	rm -rf $(VENV) .tools build *.egg-info
