//! What the fuzz targets share: an allocator that measures what a parser allocates,
//! so that a target can fail when a small input makes a parser reserve memory out of
//! proportion to it (a length or count field trusted before the bytes behind it were
//! seen), and the layouts of the targets whose input has several parts, shared with
//! the seed generator (`examples/seeds.rs`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The system allocator, counting the bytes live and their high-water mark.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Memory any parser may use whatever its input (buffers, contexts, error messages).
pub const SLACK: usize = 256 * 1024;

/// Runs `f` and fails (panics) if it allocated, at its peak, more than
/// `per_input_byte * input_len + SLACK` bytes beyond what was live before. (Memory
/// Rust's allocator hands out only: zstd's own C allocations are not counted.)
pub fn bounded<T>(input_len: usize, per_input_byte: usize, what: &str, f: impl FnOnce() -> T) -> T {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let out = f();
    let peak = PEAK.load(Relaxed).saturating_sub(base);
    let budget = per_input_byte
        .saturating_mul(input_len)
        .saturating_add(SLACK);
    assert!(
        peak <= budget,
        "{what} allocated {peak} bytes at its peak for {input_len} bytes of input (budget {budget})"
    );
    out
}

/// The input of `pack_header`: the header's start in the pack (u64 little-endian),
/// then the header's plaintext.
pub fn pack_header_input(header_start: u64, header: &[u8]) -> Vec<u8> {
    let mut out = header_start.to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out
}

/// Splits a `pack_header` input.
pub fn split_pack_header_input(data: &[u8]) -> Option<(u64, &[u8])> {
    let (start, header) = data.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*start), header))
}

/// Two texts in one input, separated by the first NUL (which neither TOML nor a
/// command may contain): the policy and the command of `wrapper_policy`.
pub fn pair_input(first: &[u8], second: &[u8]) -> Vec<u8> {
    [first, b"\0", second].concat()
}

/// Splits a [`pair_input`]; without a NUL, the whole input is the second part.
pub fn split_pair_input(data: &[u8]) -> (Option<&[u8]>, &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (Some(&data[..i]), &data[i + 1..]),
        None => (None, data),
    }
}

/// The input of `rdiff_delta`: the base's length (u16 little-endian), the base, then
/// the delta.
pub fn delta_input(base: &[u8], delta: &[u8]) -> Vec<u8> {
    let mut out = (base.len() as u16).to_le_bytes().to_vec();
    out.extend_from_slice(base);
    out.extend_from_slice(delta);
    out
}

/// Splits a `rdiff_delta` input.
pub fn split_delta_input(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (n, rest) = data.split_first_chunk::<2>()?;
    let n = usize::from(u16::from_le_bytes(*n)).min(rest.len());
    Some(rest.split_at(n))
}
