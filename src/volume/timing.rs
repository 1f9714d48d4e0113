//! Where an attach or a detach spends its time, phase by phase.
//!
//! The engine times its phases so that the agent can export latency histograms split into KDF
//! and device-mapper time and so that a slow attach can be explained from a debug
//! log line. Only durations: nothing here identifies a key.

use std::time::{Duration, Instant};

/// Phases of one attach. Phases that did not run are zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttachTimings {
    /// Fetching the secret from the key manager (keystore file, Barbican request).
    pub key_fetch: Duration,
    /// Reading and validating the LUKS header (libcryptsetup's load, and volcrypt's own parse).
    pub header: Duration,
    /// Unlocking a keyslot: the KDF, the anti-forensic merge and the digest check.
    pub kdf: Duration,
    /// Creating the dm-crypt mapping: table load, resume, and the wait for udev to process the
    /// new device (what `cryptsetup open` waits for too).
    pub dm: Duration,
    /// `false` when libcryptsetup unlocked and activated in one call (plain mode, a keyslot
    /// volcrypt's engine cannot open, a volume formatted by this attach): `dm` then includes the
    /// KDF and `kdf` is zero.
    pub kdf_split: bool,
    /// Formatting a blank device on first attach.
    pub format: Duration,
    /// The stable link and the `device_path` link.
    pub links: Duration,
    /// Writing the state record (each write is fsynced with its directory).
    pub journal: Duration,
    /// The whole engine call.
    pub total: Duration,
}

/// Phases of one detach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DetachTimings {
    /// Closing the mapping, including the retries while it is busy.
    pub dm: Duration,
    pub links: Duration,
    pub journal: Duration,
    pub total: Duration,
}

/// Adds the time a closure takes to a phase counter.
pub fn timed<T>(phase: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t0 = Instant::now();
    let out = f();
    *phase += t0.elapsed();
    out
}

/// Milliseconds with microsecond resolution, for log fields.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl AttachTimings {
    /// One debug line with every phase (no key material, no table).
    pub fn log(&self, volume_id: &str) {
        tracing::debug!(
            volume_id,
            key_fetch_ms = ms(self.key_fetch),
            header_ms = ms(self.header),
            kdf_ms = ms(self.kdf),
            dm_ms = ms(self.dm),
            kdf_split = self.kdf_split,
            format_ms = ms(self.format),
            links_ms = ms(self.links),
            journal_ms = ms(self.journal),
            total_ms = ms(self.total),
            "attach phases"
        );
    }
}

impl DetachTimings {
    pub fn log(&self, volume_id: &str) {
        tracing::debug!(
            volume_id,
            dm_ms = ms(self.dm),
            links_ms = ms(self.links),
            journal_ms = ms(self.journal),
            total_ms = ms(self.total),
            "detach phases"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timed_accumulates_into_the_phase() {
        let mut d = Duration::ZERO;
        let v = timed(&mut d, || {
            std::thread::sleep(Duration::from_millis(2));
            7
        });
        assert_eq!(v, 7);
        let first = d;
        assert!(first >= Duration::from_millis(2));
        timed(&mut d, || std::thread::sleep(Duration::from_millis(2)));
        assert!(d >= first + Duration::from_millis(2));
    }
}
