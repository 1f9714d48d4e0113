//! Hand-written AES for the hot path (placeholder until the x86 kernels land).

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use crate::crypto::xts::Implementation;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Level {}

    impl Level {
        pub fn detect_all() -> Vec<Level> {
            Vec::new()
        }
        pub fn implementation(&self) -> Implementation {
            match *self {}
        }
    }

    pub struct XtsKeys;

    impl XtsKeys {
        pub fn new(_key: &[u8], level: Level) -> Self {
            match level {}
        }
    }

    pub fn xts_sectors(
        _k: &XtsKeys,
        level: Level,
        _data: &mut [u8],
        _sector_size: usize,
        _ivs: &[[u8; 16]],
        _encrypt: bool,
    ) {
        match level {}
    }
}
