# The two commands the README promises. Both install what they need (as root) first.
.PHONY: demo test test-native test-vm bench fuzz

demo:
	scripts/install-deps.sh
	scripts/demo.sh

test:
	scripts/test-all.sh

test-native:
	VOLCRYPT_SKIP_VM=1 scripts/test-all.sh

test-vm:
	VOLCRYPT_SKIP_NATIVE=1 scripts/test-all.sh

bench:
	cargo bench --bench crypto
	cargo run --release --features bench-openssl -- bench

# Fuzz the LUKS header parser (stable toolchain; installs cargo-fuzz). `make test` runs it for
# 90 s; ask for longer with e.g. `make fuzz FUZZ_SECONDS=3600`.
FUZZ_SECONDS ?= 600
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)
