//! What `image inspect` shows: a serialisable summary of a validated header, and a text form
//! laid out like `cryptsetup luksDump` so operators find things where they expect them.
//! Salts and digests are not shown (they are not secret, but add nothing for an operator).

use std::fmt;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub version: u8,
    pub uuid: String,
    pub label: Option<String>,
    pub subsystem: Option<String>,
    /// Cipher of the data segment, e.g. "aes-xts-plain64" (None: no data segment volcrypt can
    /// open, see `no_data_segment`).
    pub cipher: Option<String>,
    /// LUKS1 hash spec (LUKS2 has per-object hashes).
    pub hash: Option<String>,
    pub volume_key_bits: usize,
    pub sector_size: Option<u32>,
    pub data_offset: Option<u64>,
    /// None = to the end of the device ("dynamic").
    pub data_size: Option<u64>,
    pub iv_tweak: Option<u64>,
    /// Why a valid LUKS2 header has no data segment volcrypt can open (e.g. a segment type it
    /// does not know): inspect shows it, decrypt and unlock refuse it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_data_segment: Option<String>,
    pub hdr_size: Option<u64>,
    pub seqid: Option<u64>,
    pub checksum_alg: Option<String>,
    /// Which LUKS2 copy was used: "primary" or "secondary".
    pub header_copy: Option<String>,
    pub keyslots_size: Option<u64>,
    pub mk_digest_iterations: Option<u32>,
    pub keyslots: Vec<KeyslotSummary>,
    pub digests: Vec<DigestSummary>,
    pub segments: Vec<SegmentSummary>,
    pub tokens: Vec<TokenSummary>,
    /// config.requirements.mandatory (any entry blocks activation in volcrypt).
    pub requirements: Vec<String>,
    pub flags: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyslotSummary {
    pub id: u32,
    /// LUKS1: ENABLED/DISABLED; LUKS2: the keyslot type ("luks2").
    pub state: String,
    pub kind: Option<String>,
    /// LUKS2: "ignore" (0), "normal" (1), "high" (2).
    pub priority: Option<String>,
    pub key_bits: usize,
    pub kdf: Option<KdfSummary>,
    pub af_stripes: Option<u32>,
    pub af_hash: Option<String>,
    pub area_offset: u64,
    pub area_size: u64,
    pub area_encryption: Option<String>,
    pub digest: Option<u32>,
    /// Bound to a data segment (LUKS2 "unbound" keyslots are false).
    pub bound: bool,
    /// Can unlock the data (active, bound, known KDF and type).
    pub usable: bool,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KdfSummary {
    pub kind: String,
    pub hash: Option<String>,
    pub iterations: Option<u32>,
    pub time: Option<u32>,
    pub memory_kib: Option<u32>,
    pub parallel: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DigestSummary {
    pub id: u32,
    pub kind: String,
    pub hash: Option<String>,
    pub iterations: Option<u32>,
    pub keyslots: Vec<u32>,
    pub segments: Vec<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SegmentSummary {
    pub id: u32,
    pub kind: String,
    pub offset: u64,
    pub size: Option<u64>,
    pub encryption: Option<String>,
    pub sector_size: Option<u32>,
    pub iv_tweak: Option<u64>,
    pub flags: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenSummary {
    pub id: u32,
    pub kind: String,
    pub keyslots: Vec<u32>,
}

fn join<T: fmt::Display>(v: &[T]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "LUKS header information")?;
        writeln!(f, "Version:        {}", self.version)?;
        if let Some(seqid) = self.seqid {
            writeln!(f, "Epoch:          {seqid}")?;
        }
        if let Some(hdr) = self.hdr_size {
            writeln!(f, "Metadata area:  {hdr} [bytes]")?;
        }
        if let Some(ks) = self.keyslots_size {
            writeln!(f, "Keyslots area:  {ks} [bytes]")?;
        }
        if let Some(copy) = &self.header_copy {
            writeln!(f, "Header copy:    {copy}")?;
        }
        writeln!(f, "UUID:           {}", self.uuid)?;
        writeln!(
            f,
            "Label:          {}",
            self.label.as_deref().unwrap_or("(no label)")
        )?;
        if self.version == 2 {
            let sub = self.subsystem.as_deref().unwrap_or("(no subsystem)");
            writeln!(f, "Subsystem:      {sub}")?;
            let flags = if self.flags.is_empty() {
                "(no flags)".to_string()
            } else {
                join(&self.flags)
            };
            writeln!(f, "Flags:          {flags}")?;
            let req = if self.requirements.is_empty() {
                "(none)".to_string()
            } else {
                join(&self.requirements)
            };
            writeln!(f, "Requirements:   {req}")?;
        }
        if let Some(why) = &self.no_data_segment {
            writeln!(f, "Data segment:   none volcrypt can open ({why})")?;
        }
        if let Some(cipher) = &self.cipher {
            writeln!(f, "Cipher:         {cipher}")?;
            writeln!(f, "Key size:       {} bits", self.volume_key_bits)?;
        }
        if let Some(hash) = &self.hash {
            writeln!(f, "Hash spec:      {hash}")?;
        }
        if let (Some(ss), Some(off)) = (self.sector_size, self.data_offset) {
            writeln!(f, "Sector size:    {ss}")?;
            writeln!(f, "Data offset:    {off} [bytes]")?;
            match self.data_size {
                Some(s) => writeln!(f, "Data size:      {s} [bytes]")?,
                None => writeln!(f, "Data size:      (whole device)")?,
            }
        }
        if let Some(it) = self.mk_digest_iterations {
            writeln!(f, "MK iterations:  {it}")?;
        }
        if self.version == 2 {
            writeln!(f, "\nData segments:")?;
            for s in &self.segments {
                writeln!(f, "  {}: {}", s.id, s.kind)?;
                writeln!(f, "\toffset: {} [bytes]", s.offset)?;
                match s.size {
                    Some(n) => writeln!(f, "\tlength: {n} [bytes]")?,
                    None => writeln!(f, "\tlength: (whole device)")?,
                }
                if let Some(e) = &s.encryption {
                    writeln!(f, "\tcipher: {e}")?;
                }
                if let Some(ss) = s.sector_size {
                    writeln!(f, "\tsector: {ss} [bytes]")?;
                }
                if let Some(t) = s.iv_tweak.filter(|&t| t != 0) {
                    writeln!(f, "\tIV tweak: {t}")?;
                }
                if !s.flags.is_empty() {
                    writeln!(f, "\tflags: {}", join(&s.flags))?;
                }
            }
        }
        writeln!(f, "\nKeyslots:")?;
        for k in &self.keyslots {
            if self.version == 1 {
                writeln!(f, "  Key Slot {}: {}", k.id, k.state)?;
                if k.state == "DISABLED" {
                    continue;
                }
            } else {
                let unbound = if k.bound { "" } else { " (unbound)" };
                writeln!(f, "  {}: {}{unbound}", k.id, k.state)?;
                writeln!(f, "\tKey:        {} bits", k.key_bits)?;
                if let Some(p) = &k.priority {
                    writeln!(f, "\tPriority:   {p}")?;
                }
            }
            if let Some(kdf) = &k.kdf {
                writeln!(f, "\tPBKDF:      {}", kdf.kind)?;
                if let Some(h) = &kdf.hash {
                    writeln!(f, "\tHash:       {h}")?;
                }
                if let Some(i) = kdf.iterations {
                    writeln!(f, "\tIterations: {i}")?;
                }
                if let Some(t) = kdf.time {
                    writeln!(f, "\tTime cost:  {t}")?;
                }
                if let Some(m) = kdf.memory_kib {
                    writeln!(f, "\tMemory:     {m}")?;
                }
                if let Some(p) = kdf.parallel {
                    writeln!(f, "\tThreads:    {p}")?;
                }
            }
            if let Some(e) = &k.area_encryption {
                writeln!(f, "\tCipher:     {e}")?;
            }
            if let (Some(s), Some(h)) = (k.af_stripes, &k.af_hash) {
                writeln!(f, "\tAF stripes: {s}")?;
                writeln!(f, "\tAF hash:    {h}")?;
            }
            writeln!(f, "\tArea offset:{} [bytes]", k.area_offset)?;
            writeln!(f, "\tArea length:{} [bytes]", k.area_size)?;
            if let Some(d) = k.digest {
                writeln!(f, "\tDigest ID:  {d}")?;
            }
            if let Some(n) = &k.note {
                writeln!(f, "\tNote:       {n}")?;
            }
        }
        if self.version == 2 {
            writeln!(f, "Tokens:")?;
            for t in &self.tokens {
                writeln!(f, "  {}: {}", t.id, t.kind)?;
                writeln!(f, "\tKeyslot:    {}", join(&t.keyslots))?;
            }
            writeln!(f, "Digests:")?;
            for d in &self.digests {
                writeln!(f, "  {}: {}", d.id, d.kind)?;
                if let Some(h) = &d.hash {
                    writeln!(f, "\tHash:       {h}")?;
                }
                if let Some(i) = d.iterations {
                    writeln!(f, "\tIterations: {i}")?;
                }
                writeln!(f, "\tKeyslots:   {}", join(&d.keyslots))?;
                writeln!(f, "\tSegments:   {}", join(&d.segments))?;
            }
        }
        Ok(())
    }
}
