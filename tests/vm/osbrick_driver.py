#!/usr/bin/env python3
"""Drives OpenStack os-brick's real volume encryptors for the interop tests (tests/osbrick_vm.rs).

Run with the venv's python (scripts/osbrick-venv.sh makes it); runs as root in the VM guest.
One process serves many requests, because importing os-brick and oslo.* takes seconds under
the VM's CPU emulation: each stdin line is a JSON request, each answer one JSON line on stdout.

  {"op": "attach", "provider": "luks"|"luks2"|"plain", "device_path": LINK,
   "secret_type": "passphrase"|"symmetric", "secret_hex": HEX,
   "encryption": {"cipher": ..., "key_size": ...}}          (encryption: optional metadata)
  {"op": "detach", ...same fields...}
  -> {"ok": true, "mapping": NAME, "commands": [["cryptsetup", "luksOpen"], ...]}
  -> {"ok": false, "error": "..."}

The first line on stdout, once os-brick has imported: {"ready": true, "os_brick": VERSION}.

The encryptor is built the way Nova builds it: `os_brick.encryptors.get_volume_encryptor` with
the volume's encryption metadata (provider, control_location front-end, cipher, key_size,
encryption_key_id) and a key manager whose `get()` returns a castellan-like managed object
(`managed_type()`, `get_encoded()`), so os-brick's own passphrase rule
(`os_brick.utils.get_passphrase_from_secret`: a passphrase secret is decoded as UTF-8 and used
as it is, any other type is hexlified) decides what cryptsetup receives.

Commands run through os-brick's own executor (`os_brick.privileged.rootwrap.execute`, i.e.
oslo.concurrency's processutils with os-brick's retries) with privsep in client mode off: the
guest runs as root, so the privileged entrypoints run in this process instead of a privsep
daemon started through sudo. One change is made to os-brick's command lines: `luksFormat` gets
a cheap fixed PBKDF (LUKS1: PBKDF2 at 1000 iterations; LUKS2: argon2id, 4 iterations, 32 MiB,
1 thread), since cryptsetup's default benchmarks ~2 s of KDF per volume (and up to 1 GiB of
memory for argon2id) on every open — the header format, cipher, key size and keyslot layout
stay os-brick's and cryptsetup's. Neither the secret nor the passphrase is ever printed; the
answer names only the commands and cryptsetup subcommands that ran.
"""

import binascii
import json
import logging
import sys
import warnings
from importlib import metadata

warnings.simplefilter("ignore")  # eventlet's deprecation notice on import, noise in test logs

from oslo_concurrency import processutils  # noqa: E402

from os_brick import encryptors  # noqa: E402
from os_brick import privileged  # noqa: E402
from os_brick.privileged import rootwrap  # noqa: E402

CHEAP_PBKDF = {
    "luks1": ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
    "luks2": ["--pbkdf", "argon2id", "--pbkdf-force-iterations", "4",
              "--pbkdf-memory", "32768", "--pbkdf-parallel", "1"],
}


class Key:
    """The subset of castellan's ManagedObject that os-brick uses."""

    def __init__(self, secret_type, payload):
        self._type = secret_type
        self._payload = payload

    def managed_type(self):
        return self._type

    def get_encoded(self):
        return self._payload


class KeyManager:
    """A key manager holding one key (what castellan's API.get returns for the volume)."""

    def __init__(self, key_id, key):
        self._key_id = key_id
        self._key = key

    def get(self, context, managed_object_id):
        if managed_object_id != self._key_id:
            raise KeyError("unknown key id %s" % managed_object_id)
        return self._key


class Recorder:
    """os-brick's executor with the cheap-PBKDF change, recording what ran (never inputs)."""

    def __init__(self):
        self.commands = []

    def __call__(self, *cmd, **kwargs):
        cmd = [str(c) for c in cmd]
        if cmd[:1] == ["cryptsetup"] and "luksFormat" in cmd:
            version = cmd[cmd.index("--type") + 1] if "--type" in cmd else "luks1"
            at = cmd.index("luksFormat") + 1
            cmd[at:at] = CHEAP_PBKDF["luks2" if version == "luks2" else "luks1"]
        sub = [c for c in cmd[1:] if not c.startswith("-")][:1]
        self.commands.append(cmd[:1] + sub)
        return rootwrap.execute(*cmd, **kwargs)


def encryptor_for(req, recorder):
    key_id = "osbrick-interop-key"
    key = Key(req["secret_type"], binascii.unhexlify(req["secret_hex"]))
    metadata = dict(req.get("encryption") or {})
    metadata.update(provider=req["provider"], control_location="front-end",
                    encryption_key_id=key_id)
    connection_info = {
        "driver_volume_type": "local",
        "data": {"device_path": req["device_path"], "volume_id": "interop"},
    }
    enc = encryptors.get_volume_encryptor(
        root_helper="", connection_info=connection_info,
        keymgr=KeyManager(key_id, key), execute=recorder, **metadata)
    return enc, metadata


def serve(req):
    recorder = Recorder()
    enc, metadata = encryptor_for(req, recorder)
    if type(enc).__name__ == "NoOpEncryptor":
        raise ValueError("os-brick chose no encryptor for provider %r" % req["provider"])
    if req["op"] == "attach":
        enc.attach_volume(None, **metadata)
    elif req["op"] == "detach":
        enc.detach_volume(**metadata)
    else:
        raise ValueError("unknown op %r" % req["op"])
    return {"ok": True, "mapping": enc.dev_name, "encryptor": type(enc).__name__,
            "commands": recorder.commands}


def main():
    # os-brick logs its normal first-attach path ("isLuks exited abnormally") and the plain
    # encryptor's deprecation as warnings; failures reach the test in the answers instead.
    logging.basicConfig(level=logging.ERROR)
    privileged.default.set_client_mode(False)
    # The first line says os-brick imported, and which release the tests run against.
    print(json.dumps({"ready": True, "os_brick": metadata.version("os-brick")}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = serve(json.loads(line))
        except processutils.ProcessExecutionError as e:
            # cmd, exit code and stderr only: the process input (the passphrase) is not in it.
            answer = {"ok": False, "error": "%s exited %s: %s" % (e.cmd, e.exit_code,
                                                                  (e.stderr or "").strip())}
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            answer = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
