//! The memory functions every freestanding binary of the system must supply itself:
//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp` (the precompiled `core` calls them).
//!
//! Linked into the core and into every domain image. Copies use `rep movsb`/`rep stosb` in
//! inline assembly so the compiler cannot turn them back into calls to themselves. Host builds
//! never link this crate (it is only a dependency of the kernel and of domain binaries), so it
//! never shadows the C library's functions in host tests.
#![no_std]

use core::arch::asm;

/// # Safety
/// `dest` and `src` must be valid for `len` bytes and must not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, len: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint; DF is clear (the
    // ABI requires it on function entry). Quadwords first, then the remaining bytes.
    unsafe {
        asm!("rep movsq", "mov rcx, {rest}", "rep movsb", rest = in(reg) len % 8,
             inout("rcx") len / 8 => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// `dest` and `src` must be valid for `len` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, len: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= len {
        // Forward copy is safe: dest is below src or the ranges do not overlap.
        // SAFETY: as for `memcpy`, forward order never reads a byte already overwritten.
        unsafe { memcpy(dest, src, len) };
    } else {
        // SAFETY: backward copy (DF set) from the last byte; DF is cleared again afterwards.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") len => _,
                 inout("rdi") dest.add(len - 1) => _,
                 inout("rsi") src.add(len - 1) => _,
                 options(nostack));
        }
    }
    dest
}

/// # Safety
/// `dest` must be valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, len: usize) -> *mut u8 {
    let byte = u64::from(value as u8);
    // SAFETY: the caller guarantees the range is valid for writes. Quadwords first (the byte
    // replicated eight times), then the remaining bytes.
    unsafe {
        asm!("rep stosq", "mov rcx, {rest}", "rep stosb", rest = in(reg) len % 8,
             inout("rcx") len / 8 => _, inout("rdi") dest => _, in("rax") byte * 0x0101_0101_0101_0101,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// `left` and `right` must be valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(left: *const u8, right: *const u8, len: usize) -> i32 {
    for index in 0..len {
        // SAFETY: index < len and both ranges are valid for `len` bytes.
        let (a, b) = unsafe { (*left.add(index), *right.add(index)) };
        if a != b {
            return i32::from(a) - i32::from(b);
        }
    }
    0
}

/// # Safety
/// As for [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(left: *const u8, right: *const u8, len: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(left, right, len) }
}
