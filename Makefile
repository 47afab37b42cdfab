# spinbox: developer entry points. `make test` installs what is missing and runs
# every tier; `make test-unit`, `make test-integration`, `make test-e2e` run one.
VENV ?= $(CURDIR)/.venv
PYTHON := $(VENV)/bin/python
PYTEST := $(PYTHON) -m pytest
export VENV

PROTOS := $(shell find spinbox/api/proto -name '*.proto' 2>/dev/null)

.PHONY: setup test test-unit test-integration test-e2e lint proto clean

setup:
	./tools/setup

test: setup
	$(PYTEST) tests

test-unit: setup
	$(PYTEST) -m unit tests

test-integration: setup
	$(PYTEST) -m integration tests

test-e2e: setup
	$(PYTEST) -m e2e tests

lint: setup
	$(PYTEST) tests/unit/test_lint.py

# Python modules generated from spinbox/api/proto with Debian's protoc, which
# matches the python3-protobuf runtime the package depends on.
proto: .proto.stamp

.proto.stamp: $(PROTOS) tools/gen-proto
	./tools/gen-proto
	@touch $@

clean:
	find spinbox guest -name '*_pb2.py' -o -name '*_pb2.pyi' | xargs -r rm -f
	rm -f .proto.stamp
	rm -rf build dist
