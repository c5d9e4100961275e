# petrel — thin wrapper around CMake. `make run` and `make test` work on a fresh
# Debian 12 machine as root: missing packages are installed first.
SHELL := /bin/bash
BUILD      ?= build
TEST_BUILD ?= build-test
JOBS       ?= $(shell nproc)
CONFIG     ?=

# Every Debian package petrel needs to build, test and run (one list).
DEB_PKGS := build-essential cmake pkg-config clang libclang-rt-14-dev \
	libuv1-dev libyaml-dev liblua5.4-dev libunbound-dev libldns-dev libssl-dev \
	libcrypt-dev libmilter-dev libcmocka-dev \
	python3 python3-pytest python3-aiosmtpd swaks dnsmasq-base openssl \
	opendkim opendkim-tools python3-dkim python3-dnspython
# Extra packages for `make bench` (Postfix gives smtp-source / smtp-sink).
BENCH_PKGS := postfix time procps
# `make bench` runs every scenario (~20 min); BENCH_MODE=receive, relay, milter,
# hooks or tls runs one (bench/README.md lists every BENCH_* knob).
BENCH_MODE ?= all

.PHONY: all deps bench-deps build run test test-build fuzz bench clean

all: build

deps:
	@missing=$$(for p in $(DEB_PKGS); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing missing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

bench-deps: deps
	@bash bench/install-deps.sh $(BENCH_PKGS)

build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo
	cmake --build $(BUILD) -j $(JOBS)

run: build
	./$(BUILD)/petrel serve $(if $(CONFIG),-c $(CONFIG))

test-build: deps
	CC=clang cmake -S . -B $(TEST_BUILD) -DCMAKE_BUILD_TYPE=Debug -DPETREL_SANITIZE=ON -DPETREL_FUZZ=ON
	cmake --build $(TEST_BUILD) -j $(JOBS)

test: test-build
	cd $(TEST_BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 900

fuzz: test-build
	cd $(TEST_BUILD) && FUZZ_SECONDS=$${FUZZ_SECONDS:-300} ctest --output-on-failure -L fuzz

bench: bench-deps
	BENCH_MODE=$(BENCH_MODE) bash bench/run.sh

clean:
	rm -rf $(BUILD) $(TEST_BUILD) build-bench
