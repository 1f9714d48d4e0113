//! The Glance image properties of an encrypted image (OpenStack's "standardized image
//! encryption": `os_encrypt_*` / `os_decrypt_*`), derived from the image itself, and the check
//! of a property set against an image.
//!
//! Where the specs leave room, the choices are (README, "Encrypted images for OpenStack"):
//! - raw LUKS is `disk_format` `luks` (the Glance spec's text; the Cinder spec proposes a
//!   `container_format` `luks` instead, which [`check`] accepts with a note); qcow2 with LUKS
//!   encryption is `disk_format` `qcow2`; `container_format` is `bare` for both;
//! - `os_encrypt_format` is `LUKSv1` or `LUKSv2`, the LUKS version of the header (qemu writes
//!   LUKS1 into qcow2 images);
//! - `os_decrypt_size` is the decrypted payload in bytes, as a decimal string (Glance property
//!   values are strings);
//! - `os_encrypt_key_deletion_policy` takes the values Glance and Cinder already act on,
//!   `on_image_deletion` or `do_not_delete` (default: the key is the user's and outlives the
//!   image); the spec example's `True`/`False` are accepted as synonyms with a note.
//! - the legacy Cinder names `cinder_encryption_key_id` and
//!   `cinder_encryption_key_deletion_policy` are accepted with a note that they are legacy.

use std::collections::BTreeMap;

use serde_json::Value;

/// How the encrypted image holds its LUKS container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    /// The file is a LUKS container (header, then the encrypted payload).
    RawLuks,
    /// A qcow2 image with qcow2's own LUKS encryption.
    Qcow2Luks,
}

/// What the properties describe, as read from the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    pub container: Container,
    /// 1 or 2.
    pub luks_version: u8,
    /// Bytes of plaintext the image decrypts to.
    pub decrypted_size: u64,
}

/// The facts of the encrypted image at `path` (raw LUKS or qcow2-LUKS): read and validated, no
/// key needed.
pub fn facts_of(path: &std::path::Path) -> Result<ImageFacts, super::Error> {
    match super::detect(path)? {
        super::Format::Qcow2 => {
            let q = super::qcow2_luks::open(path)?;
            Ok(ImageFacts {
                container: Container::Qcow2Luks,
                luks_version: q.luks.version(),
                decrypted_size: q.qcow2.virtual_size,
            })
        }
        super::Format::Luks => {
            let o = super::open(path, None)?;
            let (_, len) = o.payload_extent()?;
            Ok(ImageFacts {
                container: Container::RawLuks,
                luks_version: o.header.version(),
                decrypted_size: len,
            })
        }
    }
}

/// Whether Glance deletes the image's secret with the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeletionPolicy {
    OnImageDeletion,
    #[default]
    DoNotDelete,
}

impl DeletionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DeletionPolicy::OnImageDeletion => "on_image_deletion",
            DeletionPolicy::DoNotDelete => "do_not_delete",
        }
    }
}

/// The property set for uploading the image described by `facts` whose secret is `key_id`
/// (`None`: a placeholder the user must replace, said in the value itself).
pub fn properties(
    facts: &ImageFacts,
    key_id: Option<&str>,
    policy: DeletionPolicy,
) -> BTreeMap<&'static str, String> {
    let disk_format = match facts.container {
        Container::RawLuks => "luks",
        Container::Qcow2Luks => "qcow2",
    };
    BTreeMap::from([
        ("disk_format", disk_format.to_owned()),
        ("container_format", "bare".to_owned()),
        ("os_encrypt_format", format!("LUKSv{}", facts.luks_version)),
        (
            "os_encrypt_key_id",
            key_id.unwrap_or("<the Barbican secret id>").to_owned(),
        ),
        ("os_encrypt_key_deletion_policy", policy.as_str().to_owned()),
        ("os_decrypt_container_format", "bare".to_owned()),
        ("os_decrypt_size", facts.decrypted_size.to_string()),
    ])
}

/// What [`check`] found: disagreements fail the check, notes do not.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Findings {
    pub disagreements: Vec<String>,
    pub notes: Vec<String>,
}

/// Check the property set `props` (a JSON object, values strings or numbers) against the image.
pub fn check(facts: &ImageFacts, props: &serde_json::Map<String, Value>) -> Findings {
    let mut f = Findings::default();
    let text = |k: &str| -> Option<String> {
        props.get(k).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    };
    let mut disagree = |what: String| f.disagreements.push(what);

    let disk = text("disk_format");
    let container = text("container_format");
    match (facts.container, disk.as_deref(), container.as_deref()) {
        (Container::RawLuks, Some(d), _) if d.eq_ignore_ascii_case("luks") => {}
        (Container::RawLuks, _, Some("luks")) => f.notes.push(
            "container_format \"luks\" marks raw LUKS as the Cinder spec proposes; the Glance \
             spec uses disk_format \"luks\""
                .into(),
        ),
        (Container::Qcow2Luks, Some("qcow2"), _) => {}
        (c, d, _) => disagree(format!(
            "disk_format is {}, the image is {}",
            d.map(|d| format!("{d:?}"))
                .unwrap_or_else(|| "missing".into()),
            match c {
                Container::RawLuks => "raw LUKS (disk_format \"luks\")",
                Container::Qcow2Luks => "qcow2 with LUKS encryption (disk_format \"qcow2\")",
            }
        )),
    }
    if let Some(c) = container.as_deref()
        && !matches!(c, "bare" | "luks")
    {
        disagree(format!(
            "container_format is {c:?}: the image is a bare disk image"
        ));
    }

    let want = format!("LUKSv{}", facts.luks_version);
    match text("os_encrypt_format") {
        Some(v) if v.eq_ignore_ascii_case(&want) => {}
        Some(v) => disagree(format!(
            "os_encrypt_format is {v:?}, the image's header is {want}"
        )),
        None => disagree(format!("os_encrypt_format is missing (want {want:?})")),
    }

    match (text("os_encrypt_key_id"), text("cinder_encryption_key_id")) {
        (Some(k), legacy) => {
            if k.is_empty() || k.starts_with('<') {
                disagree(format!("os_encrypt_key_id is not a secret id: {k:?}"));
            }
            if let Some(l) = legacy.filter(|l| *l != k) {
                disagree(format!(
                    "os_encrypt_key_id {k:?} and the legacy cinder_encryption_key_id {l:?} differ"
                ));
            }
        }
        (None, Some(_)) => f.notes.push(
            "cinder_encryption_key_id is the legacy (Cinder-only) name of os_encrypt_key_id".into(),
        ),
        (None, None) => disagree("os_encrypt_key_id is missing".into()),
    }

    let policy = text("os_encrypt_key_deletion_policy");
    let legacy_policy = text("cinder_encryption_key_deletion_policy");
    if policy.is_none() && legacy_policy.is_some() {
        f.notes.push(
            "cinder_encryption_key_deletion_policy is the legacy (Cinder-only) name of \
             os_encrypt_key_deletion_policy"
                .into(),
        );
    }
    if let Some(p) = policy.or(legacy_policy) {
        match p.as_str() {
            "on_image_deletion" | "do_not_delete" => {}
            "True" | "true" | "False" | "false" => f.notes.push(format!(
                "deletion policy {p:?}: the spec's example form; Glance and Cinder act on \
                 \"on_image_deletion\" / \"do_not_delete\""
            )),
            other => disagree(format!(
                "deletion policy {other:?}: want \"on_image_deletion\" or \"do_not_delete\""
            )),
        }
    }

    if let Some(c) = text("os_decrypt_container_format")
        && c != "bare"
    {
        disagree(format!(
            "os_decrypt_container_format is {c:?}: the decrypted image is a bare disk image"
        ));
    }
    if let Some(d) = text("os_decrypt_format")
        && d != "raw"
    {
        disagree(format!(
            "os_decrypt_format is {d:?}: a decrypted LUKS payload is always raw"
        ));
    }
    match text("os_decrypt_size").map(|s| s.parse::<u64>()) {
        Some(Ok(n)) if n == facts.decrypted_size => {}
        Some(Ok(n)) => disagree(format!(
            "os_decrypt_size is {n}, the image decrypts to {} bytes",
            facts.decrypted_size
        )),
        Some(Err(_)) => disagree("os_decrypt_size is not a number of bytes".into()),
        None => disagree(format!(
            "os_decrypt_size is missing (want \"{}\")",
            facts.decrypted_size
        )),
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> ImageFacts {
        ImageFacts {
            container: Container::RawLuks,
            luks_version: 2,
            decrypted_size: 1 << 30,
        }
    }

    fn as_map(p: &BTreeMap<&'static str, String>) -> serde_json::Map<String, Value> {
        p.iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String(v.clone())))
            .collect()
    }

    #[test]
    fn derived_properties_check_clean() {
        for facts in [
            raw(),
            ImageFacts {
                container: Container::Qcow2Luks,
                luks_version: 1,
                decrypted_size: 512,
            },
        ] {
            let p = properties(&facts, Some("0f3c"), DeletionPolicy::default());
            assert_eq!(check(&facts, &as_map(&p)), Findings::default(), "{p:?}");
        }
        let p = properties(&raw(), Some("k"), DeletionPolicy::OnImageDeletion);
        assert_eq!(p["disk_format"], "luks");
        assert_eq!(p["os_encrypt_format"], "LUKSv2");
        assert_eq!(p["os_decrypt_size"], (1u64 << 30).to_string());
        assert_eq!(p["os_encrypt_key_deletion_policy"], "on_image_deletion");
    }

    #[test]
    fn every_disagreement_is_named() {
        let facts = raw();
        let mut m = as_map(&properties(&facts, None, DeletionPolicy::default()));
        m.insert("disk_format".into(), "qcow2".into());
        m.insert("os_encrypt_format".into(), "LUKSv1".into());
        m.insert("os_decrypt_size".into(), 4096.into());
        m.insert("os_encrypt_key_deletion_policy".into(), "later".into());
        let f = check(&facts, &m);
        let all = f.disagreements.join("\n");
        for want in [
            "disk_format is \"qcow2\"",
            "os_encrypt_format is \"LUKSv1\"",
            "os_decrypt_size is 4096",
            "not a secret id",
            "deletion policy \"later\"",
        ] {
            assert!(all.contains(want), "{want} missing from {all}");
        }
        assert_eq!(f.disagreements.len(), 5, "{all}");
    }

    #[test]
    fn legacy_cinder_names_and_the_spec_example_forms_are_notes() {
        let facts = raw();
        let mut m = as_map(&properties(&facts, Some("k"), DeletionPolicy::default()));
        m.remove("os_encrypt_key_id");
        m.remove("os_encrypt_key_deletion_policy");
        m.insert("cinder_encryption_key_id".into(), "k".into());
        m.insert(
            "cinder_encryption_key_deletion_policy".into(),
            "on_image_deletion".into(),
        );
        m.remove("disk_format");
        m.insert("container_format".into(), "luks".into());
        let f = check(&facts, &m);
        assert!(f.disagreements.is_empty(), "{f:?}");
        assert_eq!(f.notes.len(), 3, "{f:?}");
        m.insert("os_encrypt_key_deletion_policy".into(), "True".into());
        assert_eq!(check(&facts, &m).notes.len(), 3);
    }
}
