# One-line targets. `make run` trains (if there is no model yet) and serves; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MODEL_DIR ?= $(CURDIR)/model
# Ray Serve's HAProxy ingress (read when Ray starts); its binary package exists for Linux only.
export RAY_SERVE_ENABLE_HA_PROXY ?= $(if $(filter Linux,$(shell uname -s)),1,0)

# Debian packages the tests use: chromium (the page in a browser), wrk (load), fonts (printed digits), ss and ps,
# redis-server (GCS fault tolerance in the pods-as-hosts tests).
TEST_DEB_PACKAGES := chromium wrk fonts-dejavu-core fonts-dejavu-extra fonts-liberation iproute2 procps redis-server

.PHONY: install run train serve stop test test-deps lint bench bench-cluster soak sync-serve-config clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip && $(BIN)/python -m pip install -q -c constraints.txt -e '.[test]' && touch $@

install: $(VENV)/.installed  ## create .venv and install the package with its test extra

run: install  ## train if $(MODEL_DIR) has no model yet, then serve on http://localhost:8000
	test -f $(MODEL_DIR)/model.json || $(BIN)/python -m ray_app.train --model-dir $(MODEL_DIR)
	$(MAKE) serve

train: install  ## train a new model into $(MODEL_DIR) (replaces it only if the accuracy gate passes)
	$(BIN)/python -m ray_app.train --model-dir $(MODEL_DIR)

serve: install  ## serve $(MODEL_DIR) with ray_app/serve_config.yaml on an embedded local Ray (Ctrl-C or `make stop` ends it)
	@echo "page http://localhost:8000/  API docs http://localhost:8000/docs  Ray dashboard http://localhost:8265"
	echo $$$$ > .serve.pid && exec $(BIN)/serve run ray_app/serve_config.yaml

stop:  ## stop what `make run`/`make serve` started (other Ray clusters on the machine are left alone)
	@pid=$$(cat .serve.pid 2>/dev/null); if [ -n "$$pid" ] && ps -o args= -p $$pid | grep -q "serve run"; then kill -INT $$pid; for i in $$(seq 40); do kill -0 $$pid 2>/dev/null || break; [ $$i = 15 ] && kill -TERM $$pid; sleep 1; done; echo stopped; fi; rm -f .serve.pid

test: install test-deps  ## run the tests; they fetch MNIST into $(MODEL_DIR)/data and the KubeRay CRDs if missing
	$(BIN)/python -m pytest

test-deps:  ## as root with apt-get: install the Debian packages some tests use; otherwise say what to run
	@missing=$$(for p in $(TEST_DEB_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null \
	  | grep -q "ok installed" || echo $$p; done | xargs); \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then echo "apt-get install $$missing"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
	  || echo "apt-get failed: the tests that need $$missing will skip"; \
	elif command -v apt-get >/dev/null; then echo "some tests skip until you run: sudo apt-get install -y $$missing"; \
	else echo "some tests skip without these (Debian package names): $$missing"; fi

bench: install  ## benchmarks: Ray Serve vs the seed-style server, LitServe and BentoML (first run builds their virtualenvs under bench/peers/), Ray Train vs plain PyTorch, hostile uploads, upload-style accuracy (bench/results/)
	$(BIN)/python -m bench.serve_bench --model-dir $(MODEL_DIR) && $(BIN)/python -m bench.train_bench --data-dir $${MNIST_DATA_DIR:-$(MODEL_DIR)/data} && $(BIN)/python -m bench.hostile --model-dir $(MODEL_DIR) && $(BIN)/python -m bench.preprocess_accuracy --model-dir $(MODEL_DIR) --data-dir $${MNIST_DATA_DIR:-$(MODEL_DIR)/data} --output bench/results/upload_accuracy.md

bench-cluster: install  ## as root: the RayService with one network namespace per pod under load: pod loss, head restart, scaling (bench/results/cluster.*)
	$(BIN)/python -m bench.cluster

soak: install  ## 5 minutes at concurrency 32 against a fresh `serve run` (bench/results/soak.*)
	$(BIN)/python -m bench.soak --model-dir $(MODEL_DIR)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) model *.egg-info bench/peers/.venv-*

sync-serve-config:  ## copy ray_app/serve_config.yaml into the RayService's serveConfigV2
	$(BIN)/python kuberay/sync_serve_config.py
