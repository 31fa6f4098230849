//! Incremental Internet checksum updates (RFC 1624, eqn. 3):
//! `HC' = ~(~HC + ~m + m')`.
//!
//! Fields are handled as the raw wire bytes loaded into native integers: the
//! one's-complement sum is byte-order independent as long as every word is
//! treated the same way, so no byte swapping is needed.

/// Accumulated `~old + new` over the changed 16-bit words.
#[derive(Clone, Copy)]
pub struct Delta(u64);

impl Delta {
    #[inline(always)]
    pub const fn new() -> Self {
        Delta(0)
    }

    #[inline(always)]
    pub fn u32(self, old: u32, new: u32) -> Self {
        let o = !old;
        Delta(self.0 + (o & 0xffff) as u64 + (o >> 16) as u64 + (new & 0xffff) as u64 + (new >> 16) as u64)
    }

    #[inline(always)]
    pub fn u16(self, old: u16, new: u16) -> Self {
        Delta(self.0 + (!old) as u64 + new as u64)
    }

    /// The checksum `check` after applying this delta.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        let mut s = (!check) as u64 + self.0;
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        !(s as u16)
    }
}
