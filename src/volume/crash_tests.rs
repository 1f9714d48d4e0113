//! Every crash point of attach (first attach with its format, and the opening of an existing
//! volume), detach and reconcile, enumerated on the simulated host: crash before step k,
//! restart (reconcile), then check the invariants; and every failure after a first attach's
//! format rolled back; and concurrent operations on different volumes. Milliseconds each, no
//! VM: the VM tests prove the real backend behaves like the simulation where it matters.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::journal::Phase;
use super::sim::{Content, Crash, Sim};
use super::{Context, How, VolumeConfig, attach, detach, links, reconcile};
use crate::keys::{KeyManager, Keystore, Secret};
use crate::request::AttachRequest;
use crate::secret::{SecretBytes, SecretType};

const PASSPHRASE: &[u8] = b"correct horse";
/// The secret of key `k2`, what a rekey moves volumes to.
const NEW_PASSPHRASE: &[u8] = b"battery staple";

struct Fixture {
    _dir: tempfile::TempDir,
    sim: Arc<Sim>,
    keys: Arc<dyn KeyManager>,
    config: VolumeConfig,
}

impl Fixture {
    /// Volumes `a`, `b`, … on devices `/dev/sim/<x>` behind by-path links, one key `k`.
    fn new(content: Content) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::create(dir.path().join("keys")).unwrap();
        let secret = Secret::new(
            SecretType::Passphrase,
            SecretBytes::new(PASSPHRASE.to_vec()),
        );
        ks.put("k", &secret).unwrap();
        let new = Secret::new(
            SecretType::Passphrase,
            SecretBytes::new(NEW_PASSPHRASE.to_vec()),
        );
        ks.put("k2", &new).unwrap();
        let sim = Arc::new(Sim::new());
        for (i, v) in ["a", "b", "c", "d"].iter().enumerate() {
            sim.add_device(&format!("/dev/sim/{v}"), i as u32 + 1, content.clone());
            sim.add_link(&format!("/dev/disk/by-path/{v}"), &format!("/dev/sim/{v}"));
        }
        let config = VolumeConfig {
            state_dir: dir.path().join("state"),
            by_id_dir: PathBuf::from("/dev/disk/by-id"),
            detach_timeout_ms: 0,
            ..VolumeConfig::default()
        };
        Fixture {
            _dir: dir,
            sim,
            keys: Arc::new(ks),
            config,
        }
    }

    fn ctx(&self) -> Context<'_> {
        Context {
            keys: self.keys.as_ref(),
            config: self.config.clone(),
            sys: self.sim.clone(),
            after_kdf: None,
        }
    }

    fn request(v: &str) -> AttachRequest {
        let json = format!(
            r#"{{"volume_id":"vol-{v}","device_path":"/dev/disk/by-path/{v}","encryption":{{"provider":"luks2","control_location":"front-end","encryption_key_id":"k"}}}}"#
        );
        AttachRequest::from_json(json.as_bytes()).unwrap()
    }

    fn attach(&self, v: &str) -> Result<super::AttachOutcome, super::Error> {
        attach(&self.ctx(), &Fixture::request(v))
    }

    fn detach(&self, v: &str) -> Result<super::DetachOutcome, super::Error> {
        detach(&self.ctx(), &format!("vol-{v}"), None)
    }

    fn rekey(&self, v: &str) -> Result<super::RekeyOutcome, super::Error> {
        super::rekey(&self.ctx(), &format!("vol-{v}"), "k2")
    }

    /// The keyslots of volume `v`'s header that `passphrase` opens.
    fn opens(&self, v: &str, passphrase: &[u8]) -> bool {
        let s = self.sim.state();
        s.devices[Path::new(&format!("/dev/sim/{v}"))]
            .content
            .keyslot_for(passphrase)
            .is_some()
    }

    fn reconcile(&self) -> reconcile::Report {
        reconcile(&self.ctx().keyless(), Ok(self.keys.clone()))
    }

    /// Run `f` with a crash before step `k`; true if it crashed there.
    fn crash<T>(&self, k: usize, f: impl FnOnce() -> T) -> bool {
        self.sim.crash_before(k);
        let r = catch_unwind(AssertUnwindSafe(f));
        self.sim.crash_before(0);
        match r {
            Ok(_) => false,
            Err(p) => match p.downcast::<Crash>() {
                Ok(c) => !c.0.is_empty(),
                Err(p) => std::panic::resume_unwind(p),
            },
        }
    }

    /// The steps a complete `f` takes (on a fresh copy of the same starting point).
    fn steps_of(start: impl Fn() -> Fixture, f: impl Fn(&Fixture)) -> Vec<&'static str> {
        let fx = start();
        fx.sim.crash_before(0);
        f(&fx);
        fx.sim.taken()
    }

    fn uuid(&self, v: &str) -> Option<(String, bool)> {
        match &self.sim.state().devices[Path::new(&format!("/dev/sim/{v}"))].content {
            Content::Luks { uuid, slots } => Some((uuid.clone(), !slots.is_empty())),
            _ => None,
        }
    }

    /// The invariants that hold whenever no operation runs: every mapping has its record and
    /// every record is in a resting phase that matches the host; no format over a keyslot.
    fn check_at_rest(&self, why: &str) {
        let s = self.sim.state();
        assert_eq!(s.formats_over_data, 0, "{why}: formatted over a keyslot");
        let records = self.ctx().journal().list().unwrap();
        for name in s.maps.keys() {
            assert!(
                records.iter().any(|r| &r.mapping_name == name),
                "{why}: mapping {name} leaked (no record): {s:?}"
            );
        }
        for r in &records {
            assert_eq!(r.phase, Phase::Attached, "{why}: {r:?}");
            let m = s
                .maps
                .get(&r.mapping_name)
                .unwrap_or_else(|| panic!("{why}: record {} without mapping", r.volume_id));
            assert_eq!(m.backing, Some(r.backing_devno), "{why}");
            let mapper = links::mapper_path(&r.mapping_name);
            let stable = links::stable_link_path(&self.config.by_id_dir, &r.volume_id);
            assert_eq!(s.links.get(&stable), Some(&mapper), "{why}: stable link");
            assert_eq!(
                s.links.get(&r.device_path),
                Some(&mapper),
                "{why}: device link"
            );
        }
    }

    /// Volume `v` is attached (record, mapping on its device, both links).
    fn check_attached(&self, v: &str, why: &str) {
        self.check_at_rest(why);
        let r = self.ctx().journal().get(&format!("vol-{v}")).unwrap();
        assert!(r.is_some(), "{why}: vol-{v} not attached");
    }

    /// Volume `v` is not attached and its device link points at its device again.
    fn check_detached(&self, v: &str, why: &str) {
        self.check_at_rest(why);
        let s = self.sim.state();
        assert_eq!(self.ctx().journal().get(&format!("vol-{v}")).unwrap(), None);
        assert!(!s.maps.contains_key(&format!("crypt-{v}")), "{why}");
        let link = PathBuf::from(format!("/dev/disk/by-path/{v}"));
        assert_eq!(
            s.links.get(&link),
            Some(&PathBuf::from(format!("/dev/sim/{v}"))),
            "{why}"
        );
        let stable = links::stable_link_path(&self.config.by_id_dir, &format!("vol-{v}"));
        assert!(!s.links.contains_key(&stable), "{why}: stable link left");
    }
}

/// A crash anywhere in a first attach (journal, format header, keyslot, activation, links,
/// journal again), then the restart's reconcile, leaves either nothing (the device blank, or
/// a keyless header of this attach that the retry may format again) or the volume attached;
/// the client's retry then attaches it, and a second retry returns the same mapping. Never a
/// second format of a header with a keyslot, never a mapping without a record.
#[test]
fn first_attach_survives_a_crash_at_every_step() {
    let start = || Fixture::new(Content::Blank);
    let steps = Fixture::steps_of(start, |fx| {
        assert_eq!(fx.attach("a").unwrap().how, How::Formatted);
    });
    for s in [
        "format: header",
        "format: keyslot",
        "activate: load table",
        "set link",
    ] {
        assert!(steps.contains(&s), "{s} missing from {steps:?}");
    }
    let n = steps.len();
    for k in 1..=n {
        let fx = start();
        let why = format!("crash before step {k} of {n}");
        assert!(fx.crash(k, || fx.attach("a")), "{why}: did not crash");
        let report = fx.reconcile();
        assert!(report.failed.is_empty(), "{why}: {report:?}");
        fx.check_at_rest(&why);
        let after_restart = fx.uuid("a");
        let retry = fx
            .attach("a")
            .unwrap_or_else(|e| panic!("{why}: retry: {e}"));
        fx.check_attached("a", &why);
        let (uuid, keyslot) = fx.uuid("a").unwrap();
        assert!(keyslot, "{why}");
        if let Some((before, true)) = after_restart {
            assert_eq!(
                before, uuid,
                "{why}: a volume with a keyslot was formatted again"
            );
            assert_ne!(retry.how, How::Formatted, "{why}");
        }
        let again = fx.attach("a").unwrap();
        assert_eq!(again.how, How::AlreadyAttached, "{why}");
        assert_eq!(fx.uuid("a").unwrap().0, uuid, "{why}");
    }
}

/// The same for an existing volume: its header is never touched whatever the crash point.
#[test]
fn attach_of_an_existing_volume_survives_a_crash_at_every_step() {
    let existing = Content::luks("3f1c4a9e-0000-4000-8000-000000000001", PASSPHRASE);
    let start = || Fixture::new(existing.clone());
    let n = Fixture::steps_of(start, |fx| {
        assert_eq!(fx.attach("a").unwrap().how, How::Opened);
    })
    .len();
    for k in 1..=n {
        let fx = start();
        let why = format!("crash before step {k} of {n}");
        assert!(fx.crash(k, || fx.attach("a")), "{why}: did not crash");
        fx.reconcile();
        fx.check_at_rest(&why);
        fx.attach("a")
            .unwrap_or_else(|e| panic!("{why}: retry: {e}"));
        fx.check_attached("a", &why);
        assert_eq!(
            fx.sim.state().devices[Path::new("/dev/sim/a")].content,
            existing
        );
    }
}

/// The agent gives back its KDF share through `Context::after_kdf`: it is called once per
/// attach that unlocks a keyslot, after the unlock and before the mapping exists; a wrong key
/// or a first attach (libcryptsetup formats and unlocks) never calls it.
#[test]
fn after_kdf_runs_once_between_the_unlock_and_the_mapping() {
    use std::sync::Mutex;
    let fx = Fixture::new(Content::luks(
        "3f1c4a9e-0000-4000-8000-000000000002",
        PASSPHRASE,
    ));
    let seen: Arc<Mutex<Vec<usize>>> = Arc::default();
    let (sim, log) = (fx.sim.clone(), seen.clone());
    let ctx = fx.ctx().and_after_kdf(move || {
        log.lock().unwrap().push(sim.state().maps.len());
    });
    assert_eq!(
        attach(&ctx, &Fixture::request("a")).unwrap().how,
        How::Opened
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![0],
        "called once, before the mapping"
    );
    assert_eq!(fx.sim.state().maps.len(), 1);

    let blank = Fixture::new(Content::Blank);
    let (sim, log) = (blank.sim.clone(), seen.clone());
    let ctx = blank.ctx().and_after_kdf(move || {
        log.lock().unwrap().push(sim.state().maps.len());
    });
    assert_eq!(
        attach(&ctx, &Fixture::request("b")).unwrap().how,
        How::Formatted
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![0],
        "a format is not a userspace unlock"
    );
}

/// A crash anywhere in a detach: after the restart the volume is either still attached
/// (crashed before the journal said `detaching`) or fully detached; the retry detaches it.
#[test]
fn detach_survives_a_crash_at_every_step() {
    let start = || {
        let fx = Fixture::new(Content::Blank);
        fx.attach("a").unwrap();
        fx
    };
    let steps = Fixture::steps_of(start, |fx| {
        assert!(fx.detach("a").unwrap().was_active);
    });
    assert!(
        steps.contains(&"close") && steps.contains(&"remove link"),
        "{steps:?}"
    );
    let n = steps.len();
    for k in 1..=n {
        let fx = start();
        let why = format!("crash before step {k} of {n}");
        assert!(fx.crash(k, || fx.detach("a")), "{why}: did not crash");
        let report = fx.reconcile();
        assert!(report.failed.is_empty(), "{why}: {report:?}");
        fx.check_at_rest(&why);
        fx.detach("a")
            .unwrap_or_else(|e| panic!("{why}: retry: {e}"));
        fx.check_detached("a", &why);
        // Detaching again is a success that says nothing was active.
        assert!(!fx.detach("a").unwrap().was_active, "{why}");
    }
}

/// A crash inside the restart's reconcile (after a crash inside a first attach) is repaired by
/// the next reconcile: every pair of crash points.
#[test]
fn reconcile_survives_a_crash_at_every_step() {
    let start = || Fixture::new(Content::Blank);
    let n = Fixture::steps_of(start, |fx| {
        fx.attach("a").unwrap();
    })
    .len();
    let mut pairs = 0;
    for k in 1..=n {
        let after_crash = || {
            let fx = start();
            assert!(fx.crash(k, || fx.attach("a")));
            fx
        };
        let m = Fixture::steps_of(after_crash, |fx| {
            fx.reconcile();
        })
        .len();
        for j in 1..=m {
            let fx = after_crash();
            let why = format!("attach crash {k}/{n}, reconcile crash {j}/{m}");
            assert!(fx.crash(j, || fx.reconcile()), "{why}: did not crash");
            let report = fx.reconcile();
            assert!(report.failed.is_empty(), "{why}: {report:?}");
            fx.check_at_rest(&why);
            fx.attach("a")
                .unwrap_or_else(|e| panic!("{why}: retry: {e}"));
            fx.check_attached("a", &why);
            pairs += 1;
        }
    }
    assert!(pairs > n, "{pairs}");
}

/// A first attach that formats and then fails (activation, table load, a link) leaves the
/// device blank again, no mapping, no record and the links as they were: the retry formats and
/// attaches it.
#[test]
fn failures_after_the_format_of_a_first_attach_are_rolled_back() {
    for step in [
        "activate: create device",
        "activate: load table",
        "set link",
    ] {
        let fx = Fixture::new(Content::Blank);
        fx.sim.fail_step(Some(step));
        let e = fx.attach("a").unwrap_err();
        assert!(e.to_string().contains("injected fault"), "{step}: {e}");
        fx.sim.fail_step(None);
        assert_eq!(fx.uuid("a"), None, "{step}: header left behind");
        fx.check_detached("a", step);
        assert_eq!(fx.attach("a").unwrap().how, How::Formatted, "{step}");
        fx.check_attached("a", step);
    }
}

/// An existing volume whose attach fails is never wiped: the rollback is only for this
/// attach's own fresh header.
#[test]
fn failures_attaching_an_existing_volume_leave_its_header() {
    let existing = Content::luks("3f1c4a9e-0000-4000-8000-000000000002", PASSPHRASE);
    for step in ["activate: load table", "set link"] {
        let fx = Fixture::new(existing.clone());
        fx.sim.fail_step(Some(step));
        assert!(fx.attach("a").is_err(), "{step}");
        assert_eq!(
            fx.sim.state().devices[Path::new("/dev/sim/a")].content,
            existing
        );
        fx.check_detached("a", step);
    }
}

/// Attaches and detaches of different volumes at the same time, on one host: each ends as if
/// it had run alone.
#[test]
fn concurrent_operations_on_different_volumes_do_not_interfere() {
    let fx = Fixture::new(Content::Blank);
    std::thread::scope(|s| {
        for v in ["a", "b", "c", "d"] {
            let fx = &fx;
            s.spawn(move || {
                for round in 0..20 {
                    let o = fx.attach(v).unwrap();
                    assert_eq!(o.formatted(), round == 0, "{v} round {round}");
                    assert!(fx.detach(v).unwrap().was_active);
                }
                fx.attach(v).unwrap();
            });
        }
    });
    for v in ["a", "b", "c", "d"] {
        fx.check_attached(v, v);
    }
    assert_eq!(fx.sim.state().maps.len(), 4);
}

/// A detach while the mapping is in use keeps the attachment as it was (record, links) and
/// names the holder; once it is closed, the detach succeeds.
#[test]
fn busy_detach_changes_nothing() {
    let fx = Fixture::new(Content::Blank);
    fx.attach("a").unwrap();
    fx.sim
        .with_state(|s| s.maps.get_mut("crypt-a").unwrap().open_count = 1);
    let e = fx.detach("a").unwrap_err().to_string();
    assert!(e.contains("busy") && e.contains("simulated"), "{e}");
    fx.check_attached("a", "busy");
    fx.sim
        .with_state(|s| s.maps.get_mut("crypt-a").unwrap().open_count = 0);
    fx.detach("a").unwrap();
    fx.check_detached("a", "after");
}

/// A device with anything recognisable on it is refused: no format, no mapping, no record.
#[test]
fn a_device_with_a_signature_is_never_formatted() {
    let fx = Fixture::new(Content::Signature("ext4"));
    let e = fx.attach("a").unwrap_err();
    assert!(matches!(e, super::Error::RefuseFormat { .. }), "{e}");
    assert_eq!(
        fx.sim.state().devices[Path::new("/dev/sim/a")].content,
        Content::Signature("ext4")
    );
    fx.check_detached("a", "signature");
}

/// Attaches and detaches of the same volume at the same time (the agent and CLI commands, or
/// several CLI commands, on one host) serialise on the volume's lock: the blank device is
/// formatted exactly once, never over its keyslot, and every operation ends in a state a
/// later one understands.
#[test]
fn concurrent_operations_on_the_same_volume_serialise() {
    let fx = Fixture::new(Content::Blank);
    let formats = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for worker in 0..4 {
            let (fx, formats) = (&fx, &formats);
            s.spawn(move || {
                for round in 0..25 {
                    if (worker + round) % 3 == 0 {
                        fx.detach("a").unwrap();
                    } else if fx.attach("a").unwrap().formatted() {
                        formats.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(
        formats.into_inner(),
        1,
        "the blank device is formatted once"
    );
    fx.check_at_rest("after the storm");
    fx.attach("a").unwrap();
    fx.check_attached("a", "final attach");
    assert!(fx.uuid("a").unwrap().1);
}

/// A plain dm-crypt request with a weak-but-real cipher still opens (a user's data is never
/// stranded) and the client is told in the response's `warnings`; an allowed cipher gets none.
#[test]
fn a_weak_but_real_cipher_opens_with_a_warning_for_the_client() {
    let fx = Fixture::new(Content::Blank);
    let plain = |v: &str, cipher: &str| {
        let json = format!(
            r#"{{"volume_id":"vol-{v}","device_path":"/dev/disk/by-path/{v}","encryption":{{"provider":"plain","control_location":"front-end","cipher":"{cipher}","encryption_key_id":"k"}}}}"#
        );
        attach(
            &fx.ctx(),
            &AttachRequest::from_json(json.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let weak = plain("a", "des3_ede-cbc-plain");
    assert_eq!(weak.warnings.len(), 1, "{:?}", weak.warnings);
    assert!(
        weak.warnings[0].contains("weak cipher"),
        "{:?}",
        weak.warnings
    );
    let wire = serde_json::to_value(&weak).unwrap();
    assert_eq!(wire["warnings"][0], weak.warnings[0].as_str());
    let fine = plain("b", "aes-xts-plain64");
    assert!(fine.warnings.is_empty());
    assert!(
        serde_json::to_value(&fine)
            .unwrap()
            .get("warnings")
            .is_none()
    );
    fx.check_attached("a", "weak");
}

/// Rekey (add the new key's keyslot, journal the new key, remove the old keyslot, journal the
/// end): a crash before any step leaves a volume that the key its record names opens and the
/// same header (volume key) as before; a restart re-activates it with that key; the same rekey
/// again finishes it, after which only the new key opens it and the record and the request it
/// re-attaches with both name the new key.
#[test]
fn rekey_survives_a_crash_at_every_step() {
    let start = || {
        let fx = Fixture::new(Content::Blank);
        fx.attach("a").unwrap();
        fx
    };
    let steps = Fixture::steps_of(start, |fx| {
        let out = fx.rekey("a").unwrap();
        assert_eq!((out.keyslot, out.removed_keyslot), (1, Some(0)));
    });
    for s in ["add keyslot", "remove keyslot"] {
        assert!(steps.contains(&s), "{s} missing from {steps:?}");
    }
    let passphrase_of = |id: &str| {
        if id == "k2" {
            NEW_PASSPHRASE
        } else {
            PASSPHRASE
        }
    };
    let n = steps.len();
    for k in 1..=n {
        let fx = start();
        let why = format!("crash before step {k} of {n} ({})", steps[k - 1]);
        let uuid = fx.uuid("a");
        assert!(fx.crash(k, || fx.rekey("a")), "{why}: did not crash");
        let record = fx.ctx().journal().get("vol-a").unwrap().unwrap();
        assert!(
            fx.opens("a", passphrase_of(&record.key_id)),
            "{why}: the journaled key {} does not open the volume",
            record.key_id
        );
        assert_eq!(fx.uuid("a"), uuid, "{why}: header changed");

        // A reboot: the mapping is gone; the restart re-activates with the journaled key.
        fx.sim.with_state(|s| s.maps.clear());
        let report = fx.reconcile();
        assert!(report.failed.is_empty(), "{why}: {report:?}");
        fx.check_attached("a", &why);

        let out = fx
            .rekey("a")
            .unwrap_or_else(|e| panic!("{why}: retry: {e}"));
        assert_eq!(out.key_id, "k2", "{why}");
        assert!(fx.opens("a", NEW_PASSPHRASE), "{why}");
        assert!(!fx.opens("a", PASSPHRASE), "{why}: the old key still opens");
        let record = fx.ctx().journal().get("vol-a").unwrap().unwrap();
        assert_eq!(record.key_id, "k2", "{why}");
        assert_eq!(record.rekey, None, "{why}");
        let request_key = record
            .request
            .and_then(|r| r.encryption)
            .and_then(|e| e.encryption_key_id);
        assert_eq!(request_key.as_deref(), Some("k2"), "{why}");
        // Done: the same rekey again changes nothing and says so.
        let again = fx.rekey("a").unwrap_err().to_string();
        assert!(
            again.contains("already opens with key k2"),
            "{why}: {again}"
        );
    }
}

/// An unfinished rekey refuses another new key (naming how to finish it), and plain volumes
/// are refused before anything changes.
#[test]
fn rekey_refuses_a_second_new_key_and_plain_volumes() {
    let fx = Fixture::new(Content::Blank);
    fx.attach("a").unwrap();
    let steps = Fixture::steps_of(
        || {
            let fx = Fixture::new(Content::Blank);
            fx.attach("a").unwrap();
            fx
        },
        |fx| drop(fx.rekey("a").unwrap()),
    );
    let removal = steps.iter().position(|s| *s == "remove keyslot").unwrap() + 1;
    assert!(fx.crash(removal, || fx.rekey("a")));
    let err = super::rekey(&fx.ctx(), "vol-a", "k")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unfinished") && err.contains("--new-key-id k2"),
        "{err}"
    );

    let json = r#"{"volume_id":"vol-b","device_path":"/dev/disk/by-path/b","encryption":{"provider":"plain","control_location":"front-end","encryption_key_id":"k"}}"#;
    attach(
        &fx.ctx(),
        &AttachRequest::from_json(json.as_bytes()).unwrap(),
    )
    .unwrap();
    let before = fx.sim.state();
    let err = fx.rekey("b").unwrap_err().to_string();
    assert!(err.contains("plain dm-crypt"), "{err}");
    assert_eq!(fx.sim.state(), before);
}

/// Tune on the simulated host: the live mapping, the journal's record and the request it
/// keeps for re-activation follow the new flags; a refresh the kernel refuses, a sector size
/// and persistence on a volume without a LUKS2 header change nothing.
#[test]
fn tune_changes_the_live_flags_and_the_journal_and_a_refusal_nothing() {
    use super::{PerfFlags, tune};
    use crate::request::TuneRequest;
    let fx = Fixture::new(Content::Blank);
    fx.attach("a").unwrap();
    let ctx = fx.ctx();
    let record = || ctx.journal().get("vol-a").unwrap().unwrap();
    let name = record().mapping_name;
    let req = TuneRequest {
        allow_discards: Some(true),
        no_read_workqueue: Some(true),
        ..TuneRequest::default()
    };
    let unchanged = |why: &str, before: &super::sim::State, rec: &super::journal::Record| {
        assert_eq!(&fx.sim.state(), before, "{why}: host changed");
        assert_eq!(&record(), rec, "{why}: journal changed");
    };

    let (before, rec) = (fx.sim.state(), record());
    fx.sim.fail_step(Some("refresh"));
    let e = tune(&ctx, "vol-a", &req).unwrap_err();
    fx.sim.fail_step(None);
    assert!(e.to_string().contains("refresh"), "{e}");
    unchanged("refused refresh", &before, &rec);

    let e = tune(
        &ctx,
        "vol-a",
        &TuneRequest {
            sector_size: Some(4096),
            ..req.clone()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("sector_size"), "{e}");
    unchanged("sector size", &before, &rec);

    let o = tune(&ctx, "vol-a", &req).unwrap();
    let want = PerfFlags {
        allow_discards: true,
        no_read_workqueue: true,
        no_write_workqueue: false,
    };
    assert_eq!(
        (o.previous_flags, o.flags, o.persistent),
        (PerfFlags::default(), want, false)
    );
    assert_eq!(fx.sim.state().maps[&name].flags, want);
    assert!(fx.sim.state().header_flags.is_empty());
    let r = record();
    assert_eq!(r.flags, want);
    let stored = r.request.unwrap().options;
    assert_eq!(
        (
            stored.allow_discards,
            stored.no_read_workqueue,
            stored.no_write_workqueue
        ),
        (Some(true), Some(true), Some(false))
    );

    // Only the named flag changes; persistent stores the result in the header.
    let o = tune(
        &ctx,
        "vol-a",
        &TuneRequest {
            allow_discards: Some(false),
            persistent: true,
            ..TuneRequest::default()
        },
    )
    .unwrap();
    let want = PerfFlags {
        allow_discards: false,
        ..want
    };
    assert_eq!(o.flags, want);
    assert_eq!(fx.sim.state().header_flags[Path::new("/dev/sim/a")], want);
    assert_eq!(record().flags, want);
    fx.check_at_rest("after tune");
    assert!(matches!(
        tune(&ctx, "vol-nope", &req),
        Err(super::Error::NotManaged { .. })
    ));
}

#[test]
fn persistent_flags_are_refused_for_plain_volumes_before_anything_changes() {
    use crate::request::TuneRequest;
    let fx = Fixture::new(Content::Blank);
    let json = r#"{"volume_id":"vol-p","device_path":"/dev/disk/by-path/b","encryption":{"provider":"plain","control_location":"front-end","encryption_key_id":"k"}}"#;
    attach(
        &fx.ctx(),
        &AttachRequest::from_json(json.as_bytes()).unwrap(),
    )
    .unwrap();
    let (before, rec) = (fx.sim.state(), fx.ctx().journal().get("vol-p").unwrap());
    let req = TuneRequest {
        no_write_workqueue: Some(true),
        persistent: true,
        ..TuneRequest::default()
    };
    let e = super::tune(&fx.ctx(), "vol-p", &req).unwrap_err();
    assert!(
        e.to_string().contains("no place to store activation flags"),
        "{e}"
    );
    assert_eq!(fx.sim.state(), before);
    assert_eq!(fx.ctx().journal().get("vol-p").unwrap(), rec);
    // Without persistence the plain mapping is tuned like any other.
    let o = super::tune(
        &fx.ctx(),
        "vol-p",
        &TuneRequest {
            persistent: false,
            ..req
        },
    )
    .unwrap();
    assert!(o.flags.no_write_workqueue);
}

/// The key manager of the consumer tests: the keystore's keys, and the consumers a Barbican
/// would hold for them (a set: adding and removing are idempotent, as Barbican's are).
struct WithConsumers {
    inner: Arc<dyn KeyManager>,
    held: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
}

impl WithConsumers {
    fn held(&self) -> std::collections::BTreeSet<(String, String)> {
        self.held.lock().unwrap().clone()
    }
    fn forget_all(&self) {
        self.held.lock().unwrap().clear();
    }
}

impl KeyManager for WithConsumers {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn get(&self, key_id: &str) -> Result<Secret, crate::keys::Error> {
        self.inner.get(key_id)
    }
    fn health(&self) -> Result<(), crate::keys::Error> {
        self.inner.health()
    }
    fn add_consumer(
        &self,
        key_id: &str,
        c: &crate::keys::Consumer,
    ) -> Result<(), crate::keys::Error> {
        assert_eq!(c.resource_type, "volume");
        let entry = (key_id.to_owned(), c.resource_id.clone());
        self.held.lock().unwrap().insert(entry);
        Ok(())
    }
    fn remove_consumer(
        &self,
        key_id: &str,
        c: &crate::keys::Consumer,
    ) -> Result<(), crate::keys::Error> {
        let entry = (key_id.to_owned(), c.resource_id.clone());
        self.held.lock().unwrap().remove(&entry);
        Ok(())
    }
}

impl Fixture {
    /// A fixture whose key manager keeps consumers.
    fn with_consumers() -> (Fixture, Arc<WithConsumers>) {
        let mut fx = Fixture::new(Content::Blank);
        let c = Arc::new(WithConsumers {
            inner: fx.keys.clone(),
            held: Default::default(),
        });
        fx.keys = c.clone();
        (fx, c)
    }

    /// The consumers the journal asks for: one per record, on the record's key.
    fn journaled_consumers(&self) -> std::collections::BTreeSet<(String, String)> {
        let records = self.ctx().journal().list().unwrap();
        records
            .into_iter()
            .map(|r| (r.key_id, r.volume_id))
            .collect()
    }
}

/// The consumers follow the journal, whichever path attaches: a new attach registers, and a
/// registration lost while the agent was down (or made before consumers were turned on) comes
/// back with the restart's reconcile of the active mapping and with an attach that finds the
/// mapping already there; a detach removes it. After a crash at any step of an attach or a
/// detach, the restart's reconcile leaves exactly one consumer per record.
#[test]
fn consumers_follow_the_journal_through_every_path_and_crash() {
    let (fx, c) = Fixture::with_consumers();
    fx.attach("a").unwrap();
    let one = fx.journaled_consumers();
    assert_eq!(one.len(), 1);
    assert_eq!(c.held(), one, "new attach");
    c.forget_all();
    let report = fx.reconcile();
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(c.held(), one, "reconcile of an active, consistent mapping");
    c.forget_all();
    assert!(fx.attach("a").unwrap().already_attached());
    assert_eq!(c.held(), one, "attach that finds the mapping already there");
    fx.detach("a").unwrap();
    assert_eq!(c.held(), Default::default(), "detach");

    let attach_steps = Fixture::steps_of(
        || Fixture::with_consumers().0,
        |fx| {
            fx.attach("a").unwrap();
        },
    );
    for k in 1..=attach_steps.len() {
        let (fx, c) = Fixture::with_consumers();
        let why = format!("attach crash before step {k} of {attach_steps:?}");
        assert!(fx.crash(k, || fx.attach("a")), "{why}: did not crash");
        let report = fx.reconcile();
        assert!(report.failed.is_empty(), "{why}: {report:?}");
        assert_eq!(c.held(), fx.journaled_consumers(), "{why}");
    }

    let attached = || {
        let (fx, c) = Fixture::with_consumers();
        fx.attach("a").unwrap();
        (fx, c)
    };
    let detach_steps = Fixture::steps_of(
        || attached().0,
        |fx| {
            fx.detach("a").unwrap();
        },
    );
    for k in 1..=detach_steps.len() {
        let (fx, c) = attached();
        let why = format!("detach crash before step {k} of {detach_steps:?}");
        assert!(fx.crash(k, || fx.detach("a")), "{why}: did not crash");
        let report = fx.reconcile();
        assert!(report.failed.is_empty(), "{why}: {report:?}");
        assert_eq!(c.held(), fx.journaled_consumers(), "{why}");
    }
}
