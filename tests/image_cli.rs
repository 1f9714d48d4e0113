//! The `volcrypt image` command line as a user meets it: the real binary, its exit codes
//! (cryptsetup's), its messages, and that no secret is ever printed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const SECRET: &str = "Sup3r-Secr3t-passphrase-XYZZY";

struct Fixture {
    dir: tempfile::TempDir,
    plain: Vec<u8>,
    plain_path: PathBuf,
    key: PathBuf,
}

impl Fixture {
    fn new(len: usize) -> Self {
        let dir = tempdir();
        let plain = random_bytes(len, fresh_seed("fixture"));
        let plain_path = dir.path().join("plain.raw");
        write_file(&plain_path, &plain);
        let key = dir.path().join("key");
        write_file(&key, SECRET.as_bytes());
        Fixture {
            dir,
            plain,
            plain_path,
            key,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Encrypts the plaintext with cheap KDF settings plus `extra`, returning the image.
    fn encrypt(&self, name: &str, extra: &[&str]) -> PathBuf {
        let img = self.path(name);
        let out = check(
            volcrypt(["image", "encrypt"])
                .arg(&self.plain_path)
                .arg("--key-file")
                .arg(&self.key)
                .arg("--output")
                .arg(&img)
                .args(if extra.iter().any(|a| a.starts_with("--pbkdf")) {
                    vec![]
                } else if extra.contains(&"luks1") {
                    cheap_kdf("pbkdf2")
                } else {
                    cheap_kdf("argon2id")
                })
                .args(extra),
        );
        assert_no_secret(&out, "encrypt");
        img
    }
}

fn assert_no_secret(out: &std::process::Output, what: &str) {
    for (name, stream) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        let text = String::from_utf8_lossy(stream);
        assert!(
            !text.contains(SECRET),
            "{what}: {name} shows the passphrase: {text}"
        );
        assert!(
            !text.contains(&hex(SECRET.as_bytes())),
            "{what}: {name} shows the hex passphrase"
        );
    }
}

/// Runs volcrypt with full tracing so that logs are checked for secrets too.
fn vc(args: &[&str]) -> Command {
    let mut c = volcrypt(args);
    c.env("VOLCRYPT_LOG", "trace");
    c
}

fn arg(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A LUKS1 container with the cheapest KDF cryptsetup accepts: for tests about the CLI, not
/// the KDF.
const FAST_LUKS1: &[&str] = &[
    "--type",
    "luks1",
    "--pbkdf",
    "pbkdf2",
    "--pbkdf-iterations",
    "1000",
];

#[test]
fn round_trip_across_the_matrix_with_byte_exact_output() {
    let f = Fixture::new((2 << 20) + 4096);
    let cases: &[&[&str]] = &[
        &["--type", "luks1"],
        &[
            "--type",
            "luks1",
            "--cipher",
            "aes-cbc-essiv:sha256",
            "--key-size",
            "256",
            "--hash",
            "sha1",
        ],
        &[
            "--type",
            "luks1",
            "--cipher",
            "aes-xts-plain",
            "--hash",
            "sha512",
        ],
        &[
            "--type",
            "luks1",
            "--cipher",
            "aes-cbc-plain",
            "--key-size",
            "128",
        ],
        &[
            "--type",
            "luks1",
            "--cipher",
            "aes-cbc-plain64",
            "--key-size",
            "192",
        ],
        &[],
        &["--sector-size", "512", "--key-size", "256"],
        &[
            "--sector-size",
            "1024",
            "--pbkdf",
            "argon2i",
            "--pbkdf-iterations",
            "4",
            "--pbkdf-memory",
            "32",
            "--pbkdf-parallel",
            "1",
        ],
        &["--cipher", "aes-cbc-essiv:sha256", "--sector-size", "4096"],
        &[
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-iterations",
            "1000",
            "--hash",
            "sha512",
        ],
    ];
    for (i, extra) in cases.iter().enumerate() {
        let img = f.encrypt(&format!("img{i}"), extra);
        let out_path = f.path(&format!("out{i}"));
        let out = check(vc(&[
            "image",
            "decrypt",
            "--key-file",
            arg(&f.key),
            "-o",
            arg(&out_path),
            arg(&img),
        ]));
        assert_no_secret(&out, "decrypt");
        assert_same_bytes(&read_file(&out_path), &f.plain, &format!("{extra:?}"));
    }
}

#[test]
fn decrypt_to_stdout_streams_the_payload() {
    let f = Fixture::new(1 << 20);
    let img = f.encrypt("img", FAST_LUKS1);
    let out = check(vc(&[
        "image",
        "decrypt",
        "--key-file",
        arg(&f.key),
        "--output",
        "-",
        arg(&img),
    ]));
    assert_same_bytes(&out.stdout, &f.plain, "stdout");
    assert_no_secret(&out, "decrypt -");
}

#[test]
fn key_file_from_stdin_and_single_thread_give_the_same_plaintext() {
    let f = Fixture::new(1 << 20);
    let img = f.encrypt("img", &[]);
    let out_path = f.path("out");
    let out = run_with_stdin(
        vc(&[
            "image",
            "decrypt",
            "--threads",
            "1",
            "--key-file",
            "-",
            "-o",
            arg(&out_path),
            arg(&img),
        ]),
        SECRET.as_bytes(),
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_same_bytes(&read_file(&out_path), &f.plain, "stdin key");
}

#[test]
fn encrypt_defaults_are_cryptsetup_2_6s() {
    let f = Fixture::new(1 << 20);
    let img = f.encrypt("img", &[]);
    let out = check(vc(&["image", "inspect", "--json", arg(&img)]));
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("inspect --json is JSON");
    let text = json.to_string();
    assert!(text.contains("aes-xts-plain64"), "{text}");
    assert!(text.contains("argon2id"), "{text}");
    assert!(
        json_has_number(&json, 4096),
        "4096-byte sectors for a 4 KiB multiple: {text}"
    );
    assert!(
        json_has_number(&json, 2) || text.contains("\"2\""),
        "version 2: {text}"
    );

    // A size that is a multiple of 512 but not of 4096 gets 512-byte sectors.
    let g = Fixture::new((1 << 20) + 512);
    let img = g.encrypt("img", &[]);
    let dump = stdout(&check(Command::new(cryptsetup()).arg("luksDump").arg(&img)));
    assert!(dump.contains("sector: 512 [bytes]"), "{dump}");
    assert!(dump.contains("Key:        512 bits"), "{dump}");
}

fn json_has_number(v: &serde_json::Value, n: u64) -> bool {
    match v {
        serde_json::Value::Number(x) => x.as_u64() == Some(n),
        serde_json::Value::Array(a) => a.iter().any(|x| json_has_number(x, n)),
        serde_json::Value::Object(o) => o.values().any(|x| json_has_number(x, n)),
        _ => false,
    }
}

fn json_has_string(v: &serde_json::Value, s: &str) -> bool {
    match v {
        serde_json::Value::String(x) => x == s,
        serde_json::Value::Array(a) => a.iter().any(|x| json_has_string(x, s)),
        serde_json::Value::Object(o) => o.values().any(|x| json_has_string(x, s)),
        _ => false,
    }
}

#[test]
fn inspect_reports_what_cryptsetup_reports() {
    let f = Fixture::new(1 << 20);
    let img = f.encrypt("img", &["--label", "my-volume", "--sector-size", "2048"]);
    let uuid = stdout(&check(Command::new(cryptsetup()).arg("luksUUID").arg(&img)));
    let uuid = uuid.trim();
    assert_eq!(uuid.len(), 36, "uuid {uuid}");

    let out = check(vc(&["image", "inspect", "--json", arg(&img)]));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(json_has_string(&json, uuid), "UUID {uuid} missing: {json}");
    assert!(json_has_string(&json, "my-volume"), "label missing: {json}");
    assert!(json_has_number(&json, 2048), "sector size missing: {json}");
    // The documented top-level fields.
    assert_eq!(json["version"], 2, "{json}");
    assert_eq!(json["uuid"], uuid, "{json}");
    assert_eq!(json["label"], "my-volume", "{json}");
    assert_eq!(json["cipher"], "aes-xts-plain64", "{json}");
    assert_eq!(json["volume_key_bits"], 512, "{json}");
    assert_eq!(json["sector_size"], 2048, "{json}");
    assert_eq!(
        json["data_size"],
        serde_json::Value::Null,
        "dynamic segment: {json}"
    );
    let offset = json["data_offset"].as_u64().expect("data_offset");
    assert_eq!(
        offset + (1 << 20),
        std::fs::metadata(&img).expect("img").len(),
        "payload fills the image after data_offset"
    );
    let slots = json["keyslots"].as_array().expect("keyslots array");
    assert_eq!(slots.len(), 1, "{json}");
    assert!(slots[0].to_string().contains("argon2id"), "{json}");
    assert!(
        json["digests"].as_array().is_some_and(|d| d.len() == 1),
        "{json}"
    );
    assert!(
        json["tokens"].as_array().is_some_and(|t| t.is_empty()),
        "{json}"
    );
    assert!(
        json["requirements"]
            .as_array()
            .is_some_and(|r| r.is_empty()),
        "{json}"
    );

    let text = stdout(&check(vc(&["image", "inspect", arg(&img)])));
    for want in [uuid, "my-volume", "aes-xts-plain64", "2048", "argon2id"] {
        assert!(text.contains(want), "inspect text lacks {want}: {text}");
    }
}

#[test]
fn check_key_reports_the_slot_and_exit_2_for_a_wrong_key() {
    let f = Fixture::new(1 << 20);
    let img = f.encrypt("img", FAST_LUKS1);
    let out = check(vc(&[
        "image",
        "check-key",
        "--key-file",
        arg(&f.key),
        arg(&img),
    ]));
    assert!(stdout(&out).contains("slot 0"), "{}", stdout(&out));
    assert_no_secret(&out, "check-key");

    let out = check(vc(&[
        "image",
        "check-key",
        "--key-file",
        arg(&f.key),
        "--key-slot",
        "0",
        arg(&img),
    ]));
    assert!(stdout(&out).contains("slot 0"));
    let out = run(vc(&[
        "image",
        "check-key",
        "--key-file",
        arg(&f.key),
        "--key-slot",
        "1",
        arg(&img),
    ]));
    assert_ne!(code(&out), 0, "slot 1 is empty");

    // Trailing newline: a different passphrase (no stripping, as cryptsetup).
    let nl = f.path("key-nl");
    write_file(&nl, format!("{SECRET}\n").as_bytes());
    let out = run(vc(&[
        "image",
        "check-key",
        "--key-file",
        arg(&nl),
        arg(&img),
    ]));
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert_no_secret(&out, "wrong key");

    // Wrong key on decrypt: exit 2, no output file left behind.
    let out_path = f.path("out");
    let out = run(vc(&[
        "image",
        "decrypt",
        "--key-file",
        arg(&nl),
        "-o",
        arg(&out_path),
        arg(&img),
    ]));
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        !out_path.exists(),
        "a failed decrypt left {}",
        out_path.display()
    );
    assert_no_secret(&out, "wrong key decrypt");
}

#[test]
fn secret_type_symmetric_uses_the_lowercase_hex_of_the_key_file() {
    let f = Fixture::new(1 << 20);
    let raw = f.path("raw");
    write_file(&raw, &[0x00, 0x0f, 0xab, 0xff, 0x10]);
    let hexfile = f.path("hex");
    write_file(&hexfile, b"000fabff10");
    let img = f.path("img");
    check(vc(&[
        "image",
        "encrypt",
        arg(&f.plain_path),
        "-o",
        arg(&img),
        "--key-file",
        arg(&raw),
        "--secret-type",
        "symmetric",
        "--type",
        "luks1",
        "--pbkdf-iterations",
        "1000",
    ]));
    // The hex text as a passphrase opens it; so does the raw file as opaque; raw as passphrase does not.
    check(vc(&[
        "image",
        "check-key",
        "--key-file",
        arg(&hexfile),
        arg(&img),
    ]));
    check(vc(&[
        "image",
        "check-key",
        "--key-file",
        arg(&raw),
        "--secret-type",
        "opaque",
        arg(&img),
    ]));
    let out = run(vc(&[
        "image",
        "check-key",
        "--key-file",
        arg(&raw),
        arg(&img),
    ]));
    assert_eq!(code(&out), 2);
    check(
        Command::new(cryptsetup())
            .args(["open", "--test-passphrase", "--key-file"])
            .arg(&hexfile)
            .arg(&img),
    );
}

#[test]
fn not_luks_and_invalid_input_exit_1_naming_the_problem() {
    let f = Fixture::new(1 << 20);
    // Random bytes: not LUKS.
    let out = run(vc(&["image", "inspect", arg(&f.plain_path)]));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let msg = stderr(&out);
    assert!(
        msg.contains("plain.raw") && msg.to_lowercase().contains("luks"),
        "{msg}"
    );

    // A corrupted LUKS1 header field (key bytes = 0).
    let img = f.encrypt("img", FAST_LUKS1);
    let mut bytes = read_file(&img);
    bytes[108..112].copy_from_slice(&0u32.to_be_bytes());
    let bad = f.path("bad");
    write_file(&bad, &bytes);
    let out = run(vc(&["image", "inspect", arg(&bad)]));
    assert_eq!(code(&out), 1, "{}", stderr(&out));

    // Unsupported cipher: refused, naming it.
    let out = run(vc(&[
        "image",
        "encrypt",
        arg(&f.plain_path),
        "-o",
        arg(&f.path("x")),
        "--key-file",
        arg(&f.key),
        "--cipher",
        "serpent-xts-plain64",
        "--pbkdf-iterations",
        "1000",
        "--pbkdf",
        "pbkdf2",
    ]));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("serpent"), "{}", stderr(&out));

    // LUKS1 has no argon2.
    let out = run(vc(&[
        "image",
        "encrypt",
        arg(&f.plain_path),
        "-o",
        arg(&f.path("y")),
        "--key-file",
        arg(&f.key),
        "--type",
        "luks1",
        "--pbkdf",
        "argon2id",
    ]));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("LUKS1"), "{}", stderr(&out));
}

#[test]
fn input_that_is_not_whole_sectors_is_refused_naming_its_size() {
    let f = Fixture::new(1000);
    let out_path = f.path("out");
    let out = run(vc(&[
        "image",
        "encrypt",
        arg(&f.plain_path),
        "-o",
        arg(&out_path),
        "--key-file",
        arg(&f.key),
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-iterations",
        "1000",
    ]));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let msg = stderr(&out);
    assert!(
        msg.contains("1000") && msg.contains("512") && msg.contains("1024"),
        "{msg}"
    );
    assert!(!out_path.exists(), "nothing written");

    let g = Fixture::new(4096 + 512);
    let out = run(vc(&[
        "image",
        "encrypt",
        arg(&g.plain_path),
        "-o",
        arg(&out_path),
        "--key-file",
        arg(&g.key),
        "--sector-size",
        "4096",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-iterations",
        "1000",
    ]));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("4608"), "{}", stderr(&out));
}

#[test]
fn kdf_costs_above_the_limits_exit_3_before_any_work() {
    let f = Fixture::new(1 << 20);
    let img = f.encrypt("img", &[]); // argon2id, 64 KiB
    let out = run(vc(&[
        "image",
        "check-key",
        "--key-file",
        arg(&f.key),
        "--max-pbkdf-memory",
        "32",
        arg(&img),
    ]));
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let out = run(vc(&[
        "image",
        "decrypt",
        "--key-file",
        arg(&f.key),
        "--max-argon2-time",
        "3",
        "-o",
        "-",
        arg(&img),
    ]));
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "no plaintext when refused");

    let img1 = f.encrypt(
        "img1",
        &[
            "--type",
            "luks1",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-iterations",
            "2000",
        ],
    );
    let out = run(vc(&[
        "image",
        "check-key",
        "--key-file",
        arg(&f.key),
        "--max-pbkdf-iterations",
        "1999",
        arg(&img1),
    ]));
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    check(vc(&[
        "image",
        "check-key",
        "--key-file",
        arg(&f.key),
        "--max-pbkdf-iterations",
        "2000",
        arg(&img1),
    ]));

    // Asking encrypt for more than the limit is refused too.
    let out = run(vc(&[
        "image",
        "encrypt",
        arg(&f.plain_path),
        "-o",
        arg(&f.path("z")),
        "--key-file",
        arg(&f.key),
        "--pbkdf",
        "argon2id",
        "--pbkdf-iterations",
        "4",
        "--pbkdf-memory",
        "4096",
        "--max-pbkdf-memory",
        "1024",
    ]));
    assert_eq!(code(&out), 3, "{}", stderr(&out));
}

#[test]
fn missing_files_exit_4_naming_the_file() {
    let f = Fixture::new(4096);
    let missing = f.path("does-not-exist.img");
    let out = run(vc(&["image", "inspect", arg(&missing)]));
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does-not-exist.img"),
        "{}",
        stderr(&out)
    );

    let img = f.encrypt("img", &[]);
    let out = run(vc(&[
        "image",
        "check-key",
        "--key-file",
        arg(&missing),
        arg(&img),
    ]));
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("does-not-exist.img"));

    let out = run(vc(&[
        "image",
        "inspect",
        "--header",
        arg(&missing),
        arg(&img),
    ]));
    assert_eq!(code(&out), 4, "{}", stderr(&out));
}

#[test]
fn outputs_never_overwrite_inputs() {
    let f = Fixture::new(1 << 20);
    let img = f.encrypt("img", &[]);
    let before = read_file(&img);
    let out = run(vc(&[
        "image",
        "decrypt",
        "--key-file",
        arg(&f.key),
        "-o",
        arg(&img),
        arg(&img),
    ]));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("same file"), "{}", stderr(&out));
    assert_eq!(read_file(&img), before, "image untouched");

    // Through another name (a hard link) too.
    let link = f.path("link");
    std::fs::hard_link(&f.plain_path, &link).expect("hard link");
    let out = run(vc(&[
        "image",
        "encrypt",
        arg(&f.plain_path),
        "-o",
        arg(&link),
        "--key-file",
        arg(&f.key),
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-iterations",
        "1000",
    ]));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert_same_bytes(&read_file(&f.plain_path), &f.plain, "input untouched");
}

#[test]
fn detached_header_puts_the_payload_at_offset_0() {
    let f = Fixture::new(1 << 20);
    let hdr = f.path("hdr");
    let img = f.encrypt("img", &["--header", arg(&hdr)]);
    assert_eq!(
        std::fs::metadata(&img).expect("img").len(),
        f.plain.len() as u64
    );
    // Without the header the payload is not LUKS.
    let out = run(vc(&["image", "inspect", arg(&img)]));
    assert_eq!(code(&out), 1);
    check(vc(&["image", "inspect", "--header", arg(&hdr), arg(&img)]));
    let out = check(vc(&[
        "image",
        "check-key",
        "--header",
        arg(&hdr),
        "--key-file",
        arg(&f.key),
        arg(&img),
    ]));
    assert!(stdout(&out).contains("slot 0"));
    let out = check(vc(&[
        "image",
        "decrypt",
        "--header",
        arg(&hdr),
        "--key-file",
        arg(&f.key),
        "-o",
        "-",
        arg(&img),
    ]));
    assert_same_bytes(&out.stdout, &f.plain, "detached");
}

/// Adds an unknown mandatory requirement to both header copies of a LUKS2 image,
/// recomputing each copy's checksum so the header stays valid.
fn add_mandatory_requirement(img: &Path, name: &str) {
    let mut b = read_file(img);
    let hdr = u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")) as usize;
    let area = &b[4096..hdr];
    let end = area
        .iter()
        .position(|&c| c == 0)
        .expect("JSON ends with NUL");
    let mut v: serde_json::Value = serde_json::from_slice(&area[..end]).expect("JSON");
    v["config"]["requirements"] = serde_json::json!({ "mandatory": [name] });
    let text = serde_json::to_vec(&v).expect("JSON text");
    for at in [0, hdr] {
        let area = &mut b[at + 4096..at + hdr];
        area.fill(0);
        area[..text.len()].copy_from_slice(&text);
        b[at + 0x1C0..at + 0x200].fill(0);
        let sum = volcrypt::crypto::HashAlg::Sha256.digest(&[&b[at..at + hdr]]);
        b[at + 0x1C0..at + 0x1C0 + 32].copy_from_slice(&sum);
    }
    write_file(img, &b);
}

#[test]
fn unknown_mandatory_requirement_refuses_decrypt_but_inspect_lists_it() {
    let f = Fixture::new(64 << 10);
    let img = f.encrypt("img", &[]);
    add_mandatory_requirement(&img, "volcrypt-future-thing");

    let out = check(vc(&["image", "inspect", "--json", arg(&img)]));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(
        json_has_string(&json["requirements"], "volcrypt-future-thing"),
        "requirement not listed: {json}"
    );
    let text = stdout(&check(vc(&["image", "inspect", arg(&img)])));
    assert!(text.contains("volcrypt-future-thing"), "{text}");

    let plain = f.path("plain.out");
    let out = run(vc(&[
        "image",
        "decrypt",
        arg(&img),
        "--key-file",
        arg(&f.key),
        "--output",
        arg(&plain),
    ]));
    assert_eq!(code(&out), 1, "decrypt: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("volcrypt-future-thing") && err.contains("requirement"),
        "message does not name the requirement: {err}"
    );
    assert!(
        !plain.exists() || read_file(&plain).is_empty(),
        "plaintext written despite the refusal"
    );
    assert_no_secret(&out, "decrypt");
}

/// Runs `args` with standard output a pipe whose reader is already gone (`… | head` after
/// head exited): the command must end quietly with exit 0, like a Unix tool, neither
/// panicking ("failed printing to stdout: Broken pipe") nor reporting an error.
fn run_into_closed_pipe(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = volcrypt(args)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("volcrypt runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{args:?} into a closed pipe: {:?} {err}",
        out.status
    );
    assert!(
        !err.contains("panicked") && !err.to_lowercase().contains("broken pipe"),
        "{args:?} into a closed pipe is not quiet: {err}"
    );
    out
}

#[test]
fn a_closed_stdout_pipe_ends_every_printing_command_quietly() {
    let f = Fixture::new(1 << 20);
    let img = f.encrypt("img", FAST_LUKS1);
    run_into_closed_pipe(&["image", "inspect", "--json", arg(&img)]);
    run_into_closed_pipe(&["image", "inspect", arg(&img)]);
    run_into_closed_pipe(&[
        "image",
        "decrypt",
        "--key-file",
        arg(&f.key),
        "--output",
        "-",
        arg(&img),
    ]);
    run_into_closed_pipe(&["image", "check-key", "--key-file", arg(&f.key), arg(&img)]);
    run_into_closed_pipe(&["--help"]);
    // Real errors still report, even with the pipe closed.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = volcrypt(["image", "inspect", arg(&f.plain_path)])
        .stdout(writer)
        .output()
        .expect("volcrypt runs");
    assert_eq!(out.status.code(), Some(1), "not LUKS still exits 1");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a LUKS device"));
}
