# The two commands the README promises. Both install what they need (as root) first.
.PHONY: demo test test-native test-vm test-vagrant deb bench bench-vm fuzz

demo:
	scripts/install-deps.sh
	scripts/demo.sh

test:
	scripts/test-all.sh

test-native:
	VOLCRYPT_SKIP_VM=1 VOLCRYPT_SKIP_VAGRANT=1 scripts/test-all.sh

test-vm:
	VOLCRYPT_SKIP_NATIVE=1 VOLCRYPT_SKIP_VAGRANT=1 scripts/test-all.sh

# The Debian package (cargo-deb): target/debian/volcrypt_<version>_amd64.deb.
deb:
	scripts/install-deps.sh
	packaging/build-deb.sh

# The Vagrant end-to-end stage alone (root; see vagrant/README.md).
test-vagrant:
	vagrant/run.sh

# Benchmarks print ratios against a reference measured in the same run (never pass/fail on
# speed). `bench`: natively; `bench-vm`: the ones that need dm-crypt, in the VM (ratios of like
# with like only: under emulation SIMD code slows down out of proportion).
bench:
	cargo bench --bench crypto
	cargo run --release --features bench-openssl -- bench
	scripts/bench-image-verify.sh
	scripts/bench-image-convert.sh

bench-vm:
	tests/vm/bench-attach.sh
	tests/vm/bench-reactivate.sh
	tests/vm/bench-verify.sh

# Fuzz the LUKS header parser (stable toolchain; installs cargo-fuzz). `make test` runs it for
# 90 s; ask for longer with e.g. `make fuzz FUZZ_SECONDS=3600`.
FUZZ_SECONDS ?= 600
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)
