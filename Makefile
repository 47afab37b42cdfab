# spinbox: developer entry points. `make test` installs what is missing and runs
# every tier; `make test-unit`, `make test-integration`, `make test-e2e` run one.
VENV ?= $(CURDIR)/.venv
PYTHON := $(VENV)/bin/python
PYTEST := $(PYTHON) -m pytest
export VENV

PROTOS := $(shell find spinbox/api/proto -name '*.proto' 2>/dev/null)

.PHONY: setup test test-unit test-integration test-e2e test-e2e-templates test-system-containers test-templates soak faults conformance lint proto deb install demo demo-clean clean

setup:
	./tools/setup

test: setup
	$(PYTEST) -m "not long" tests

test-unit: setup
	$(PYTEST) -m unit tests

test-integration: setup
	$(PYTEST) -m integration tests

test-e2e: setup
	$(PYTEST) -m "e2e and not long" tests

# The e2e tier again with every VM that can be restored from a template
# (vm.boot = "template" in the tests' spinbox.toml): a container from a template
# must behave as a cold-booted one. VMs with a virtio-fs share boot cold there too.
test-e2e-templates: setup
	SPINBOX_TEST_BOOT=template $(PYTEST) -m "e2e and not long" tests

# systemd and Docker inside a spinbox container: builds a Debian image with
# mmdebstrap (minutes) and boots it in a large VM, so it runs on its own.
test-system-containers: setup
	$(PYTEST) tests/e2e/test_syscont.py

# Containers in VMs restored from templates (vm.boot = "template", opt-in) alone;
# `make test` runs them too.
test-templates: setup
	$(PYTEST) tests/e2e/test_templates.py

# The whole soak: four creates at once, five rounds, containerd 1.6 and 2.x, ctr
# and CRI pods (`make test` runs two rounds of it); then ten CRI pods created at
# once, two containers each. bench/soak counts leftovers
# over 200 lifecycles.
soak: setup
	SPINBOX_SOAK_ROUNDS=5 $(PYTEST) tests/e2e/test_soak.py
	$(PYTEST) tests/e2e/test_cri_pods.py -k ten_pods

# The whole fault matrix (tests/e2e/test_faults.py): `make test` runs the faults that
# need one VM each; this adds spinboxd killed in a create and in a stop, containerd
# restarted, a full disk during writeback, and a pod VM's QEMU killed with a member's layer
# to write back (restarts and helper VMs: minutes).
faults: setup
	$(PYTEST) tests/e2e/test_faults.py

# critest, the CRI validation suite, in full against containerd 1.6 and 2.x with the
# `spinbox` handler (tens of minutes under TCG; `make test` runs a focused subset).
# JUnit reports, logs and counts go to build/critest/.
conformance: setup
	SPINBOX_CONFORMANCE=full $(PYTEST) -s tests/e2e/test_critest.py

lint: setup
	$(PYTEST) tests/unit/test_lint.py

# Python modules generated from spinbox/api/proto with Debian's protoc, which
# matches the python3-protobuf runtime the package depends on.
proto: .proto.stamp

.proto.stamp: $(PROTOS) tools/gen-proto
	./tools/gen-proto
	@touch $@

# The Debian package: dist/spinbox_<version>_<arch>.deb (dpkg-buildpackage in
# build/deb with packaging/debian as debian/), then lintian, failing on errors.
deb: setup
	./tools/build-deb
	lintian --fail-on error dist/spinbox_*.deb

# The package's file layout under DESTDIR (what debian/rules installs).
install: proto
	./tools/install-tree "$(DESTDIR)"

# On a fresh Debian 12 machine, as root: build and install the package, start
# it, and run a container in a VM (tools/demo says how to clean up after).
demo: deb
	$(PYTHON) ./tools/demo

demo-clean:
	$(PYTHON) ./tools/demo clean

clean:
	find spinbox guest -name '*_pb2.py' -o -name '*_pb2.pyi' | xargs -r rm -f
	rm -f .proto.stamp
	rm -rf build dist
