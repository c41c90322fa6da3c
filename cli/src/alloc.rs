//! The binary's global allocator: the system allocator (glibc) for everything but large
//! blocks, which get mappings of their own backed by transparent huge pages.
//!
//! The aggregator's per-click path is a handful of random reads into large tables (the
//! dedup tier, the ad owners, an hour's cells, the top-N nodes, the sketch slabs), each a
//! cache miss and, with 4 KiB pages, a TLB miss too: a page walk, which under a hypervisor
//! (nested paging) costs several more memory reads. Huge pages (2 MiB) cover those tables
//! with a few hundred TLB entries. Linux hands them out only for regions advised
//! `MADV_HUGEPAGE` when the machine's THP mode is `madvise` (the common default).
//!
//! A block of [`HUGE_MIN`] bytes or more is therefore an anonymous mapping of its own,
//! 2 MiB aligned and advised, unmapped when freed and grown with `mremap`: the advice covers
//! that block and dies with it. (Advising blocks glibc had placed would leave the hint on
//! its heap after the free, for the small blocks that reuse the range.) Everything smaller
//! stays with glibc on 4 KiB pages: zeroing a fresh 2 MiB page for a transient buffer costs
//! more than it saves (glibc's `hugetlb=1` tunable, which advises the whole heap, measured
//! 10% slower; BENCHMARKS.md). With THP `never` the advice is a no-op; with `always` it
//! changes nothing. A failed mapping is an allocation failure (null), as `System`'s.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::c_void;

use rustix::mm::{Advice, MapFlags, MremapFlags, ProtFlags};

/// Blocks from this size on get a mapping of their own: the long-lived tables, and the
/// largest batch buffers (a decode vector of ~23k clicks or more). 2, 4 and 8 MiB measured
/// the same within noise (BENCHMARKS.md, ninth pass).
const HUGE_MIN: usize = 4 << 20;

/// A huge page on x86-64 (the module is built for x86-64 Linux only: other targets have
/// other page sizes and keep the system allocator).
const HUGE_PAGE: usize = 2 << 20;

/// A base page on x86-64: mapping lengths are multiples of it.
const PAGE: usize = 4 << 10;

/// See the module doc.
#[derive(Debug)]
pub struct HugePages;

/// Whether a block of this layout is a mapping of its own. `GlobalAlloc` hands `dealloc`
/// and `realloc` the layout the block was allocated with, so the answer never changes for
/// a block.
fn is_big(size: usize, align: usize) -> bool {
    size >= HUGE_MIN && align <= HUGE_PAGE
}

/// The length of the mapping of a block of `size` bytes (`None`: overflow).
fn map_len(size: usize) -> Option<usize> {
    size.checked_next_multiple_of(PAGE)
}

/// Maps `size` bytes (zeroed), 2 MiB aligned, advised `MADV_HUGEPAGE`; null on failure.
fn map_big(size: usize) -> *mut u8 {
    let Some(len) = map_len(size) else {
        return std::ptr::null_mut();
    };
    let Some(over) = len.checked_add(HUGE_PAGE) else {
        return std::ptr::null_mut();
    };
    // SAFETY: a new private anonymous mapping at an address the kernel picks: no existing
    // memory is touched.
    let Ok(raw) = (unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            over,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
        )
    }) else {
        return std::ptr::null_mut();
    };
    // Keep the 2 MiB aligned `len` bytes inside, give back the rest: every huge page of
    // the block can then be a huge page.
    let start = (raw as usize).next_multiple_of(HUGE_PAGE);
    let head = start - raw as usize;
    let tail = over - head - len;
    // SAFETY: both ranges lie inside the mapping just made and outside the part kept.
    unsafe {
        if head > 0 {
            let _ = rustix::mm::munmap(raw, head);
        }
        if tail > 0 {
            let _ = rustix::mm::munmap((start + len) as *mut c_void, tail);
        }
    }
    advise(start, len);
    start as *mut u8
}

/// Advises `[start, start + len)`, a mapping of this allocator. A failure (THP compiled
/// out of the kernel) leaves 4 KiB pages: ignored.
fn advise(start: usize, len: usize) {
    // SAFETY: the range is one of this allocator's mappings; MADV_HUGEPAGE only changes
    // how the kernel backs it, never its contents.
    let _ = unsafe { rustix::mm::madvise(start as *mut c_void, len, Advice::LinuxHugepage) };
}

/// Unmaps a block [`map_big`] returned for `size` bytes.
///
/// # Safety
/// `ptr` is such a block, not used afterwards.
unsafe fn unmap_big(ptr: *mut u8, size: usize) {
    if let Some(len) = map_len(size) {
        // SAFETY: the caller's guarantee; the mapping is exactly `len` bytes at `ptr`.
        let _ = unsafe { rustix::mm::munmap(ptr.cast(), len) };
    }
}

// SAFETY: small blocks are forwarded to `System` unchanged. A big block is a mapping of its
// own, at least `size` bytes, aligned to 2 MiB (so to any `align <= HUGE_PAGE`), zeroed,
// and released exactly once by `dealloc` or `realloc`, which tell big from small by the
// layout the block was allocated with (`is_big`).
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_big(layout.size(), layout.align()) {
            return map_big(layout.size());
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_big(layout.size(), layout.align()) {
            // A fresh anonymous mapping reads as zeros.
            return map_big(layout.size());
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_big(layout.size(), layout.align()) {
            // SAFETY: allocated as a big block with this layout (the caller's guarantee).
            return unsafe { unmap_big(ptr, layout.size()) };
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (was_big, big) = (
            is_big(layout.size(), layout.align()),
            is_big(new_size, layout.align()),
        );
        if !was_big && !big {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        if was_big
            && big
            && let (Some(old), Some(new)) = (map_len(layout.size()), map_len(new_size))
        {
            // The pages move with the mapping (no copy); the advice too, and it is given
            // again for the grown part.
            // SAFETY: `ptr` is a mapping of `old` bytes (the caller's guarantee).
            return match unsafe { rustix::mm::mremap(ptr.cast(), old, new, MremapFlags::MAYMOVE) } {
                Ok(p) => {
                    advise(p as usize, new);
                    p.cast()
                }
                Err(_) => std::ptr::null_mut(),
            };
        }
        // Crossing the threshold: a new block of the other kind, the bytes copied over.
        // SAFETY: `new_size` is nonzero and, rounded to `align`, fits `isize` (the
        // caller's guarantees for `realloc`).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: a valid nonzero layout (above).
        let p = unsafe { self.alloc(new_layout) };
        if !p.is_null() {
            // SAFETY: both blocks hold at least the smaller size; they are distinct; the
            // old one is released once, with the layout it was allocated with.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Big blocks: aligned, zeroed, usable to their last byte, grown and shrunk across the
    /// threshold with their bytes kept, released; small ones go to the system allocator.
    #[test]
    fn big_blocks_are_huge_page_aligned_mappings_that_keep_their_bytes() {
        let a = HugePages;
        let big = Layout::from_size_align(HUGE_MIN + 123, 64).unwrap();
        // SAFETY (test): every block is used within its size and released once with the
        // layout it has.
        unsafe {
            let p = a.alloc_zeroed(big);
            assert!(!p.is_null());
            assert!((p as usize).is_multiple_of(HUGE_PAGE));
            let s = std::slice::from_raw_parts_mut(p, big.size());
            assert!(s.iter().all(|&b| b == 0));
            for (i, b) in s.iter_mut().enumerate() {
                *b = i as u8;
            }
            // Grown (mremap), then shrunk below the threshold (copied to glibc), then grown
            // above it again (copied to a mapping).
            let p = a.realloc(p, big, 3 * HUGE_MIN);
            assert!(!p.is_null());
            let grown = Layout::from_size_align(3 * HUGE_MIN, 64).unwrap();
            *p.add(3 * HUGE_MIN - 1) = 7;
            let small = 1000;
            let p = a.realloc(p, grown, small);
            assert!(!p.is_null());
            let s = std::slice::from_raw_parts(p, small);
            assert!(s.iter().enumerate().all(|(i, &b)| b == i as u8));
            let small_layout = Layout::from_size_align(small, 64).unwrap();
            let p = a.realloc(p, small_layout, HUGE_MIN);
            assert!(!p.is_null());
            assert!((p as usize).is_multiple_of(HUGE_PAGE));
            let s = std::slice::from_raw_parts(p, small);
            assert!(s.iter().enumerate().all(|(i, &b)| b == i as u8));
            a.dealloc(p, Layout::from_size_align(HUGE_MIN, 64).unwrap());
            // Alignments above a huge page stay with the system allocator.
            let odd = Layout::from_size_align(HUGE_MIN, 2 * HUGE_PAGE).unwrap();
            assert!(!is_big(odd.size(), odd.align()));
            let q = a.alloc(odd);
            assert!(!q.is_null() && (q as usize).is_multiple_of(2 * HUGE_PAGE));
            a.dealloc(q, odd);
        }
        assert!(is_big(HUGE_MIN, 8) && !is_big(HUGE_MIN - 1, 8));
        assert_eq!(map_len(usize::MAX), None);
        assert!(map_big(usize::MAX - PAGE).is_null());
    }
}
