//! The binary's global allocator: the system allocator (glibc), with transparent huge
//! pages asked for on large blocks.
//!
//! The aggregator's per-click path is a handful of random reads into large tables (the
//! dedup tier, the ad owners, an hour's cells, the top-N nodes, the sketch slabs), each a
//! cache miss and, with 4 KiB pages, a TLB miss too: a page walk, which under a hypervisor
//! (nested paging) costs several more memory reads. Huge pages (2 MiB) cover those tables
//! with a few hundred TLB entries. Linux hands them out only for regions advised
//! `MADV_HUGEPAGE` when the machine's THP mode is `madvise` (the common default), so every
//! block of [`HUGE_MIN`] bytes or more is advised as it is allocated or grown (the 2 MiB
//! aligned part of it: the advice never reaches a neighbouring block). Small and
//! short-lived blocks are left alone: zeroing a fresh 2 MiB page for a transient buffer
//! costs more than it saves (glibc's `hugetlb=1` tunable, which advises the whole heap,
//! measured 10% slower; BENCHMARKS.md). With THP `never` the advice is a no-op; with
//! `always` it changes nothing.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks from this size on are advised: above a batch's transient buffers, and only the
/// 2 MiB pages wholly inside a block are advised (at most one partly used page per block,
/// at its touched end). 8 MiB gave most of the gain, 2 MiB no more than 4 (BENCHMARKS.md).
const HUGE_MIN: usize = 4 << 20;

/// A huge page (x86-64, aarch64 with 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// See the module doc.
pub struct HugePages;

/// The whole 2 MiB pages inside a block at address `p` of `len` bytes, if it is large
/// enough to advise and holds any.
fn huge_range(p: usize, len: usize) -> Option<(usize, usize)> {
    if p == 0 || len < HUGE_MIN {
        return None;
    }
    let start = p.checked_next_multiple_of(HUGE_PAGE)?;
    let end = p.checked_add(len)? / HUGE_PAGE * HUGE_PAGE;
    (end > start).then_some((start, end))
}

/// Advises the whole 2 MiB pages inside `[p, p + len)`.
fn advise(p: *mut u8, len: usize) {
    if let Some((start, end)) = huge_range(p as usize, len) {
        // SAFETY: the range lies inside a block this allocator just handed out (so it is
        // mapped and ours); MADV_HUGEPAGE only changes how the kernel backs it, never its
        // contents. A failure (THP compiled out) leaves 4 KiB pages: ignored.
        let _ = unsafe {
            rustix::mm::madvise(
                start as *mut std::ffi::c_void,
                end - start,
                rustix::mm::Advice::LinuxHugepage,
            )
        };
    }
}

// SAFETY: every call is forwarded to `System` unchanged; `advise` only adds a hint on the
// memory `System` returned.
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        advise(p, new_size);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_huge_pages_inside_large_blocks_are_advised() {
        const M: usize = 1 << 20;
        // Too small, or no whole 2 MiB page inside.
        assert_eq!(huge_range(0x1000, HUGE_MIN - 1), None);
        assert_eq!(huge_range(0, 64 * M), None);
        // An aligned block: all of it.
        assert_eq!(huge_range(4 * M, 8 * M), Some((4 * M, 12 * M)));
        // An unaligned block: the aligned pages strictly inside, never past either end.
        let p = 4 * M + 16;
        let (s, e) = huge_range(p, 8 * M).unwrap();
        assert_eq!((s, e), (6 * M, 12 * M));
        assert!(s >= p && e <= p + 8 * M);
        // Next to the top of the address space: no overflow.
        assert_eq!(huge_range(usize::MAX - 16, HUGE_MIN), None);
    }
}
