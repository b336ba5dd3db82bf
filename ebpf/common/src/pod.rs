//! `aya::Pod` for the map value types (feature `user`), so the loader reads and writes them
//! through aya's typed maps. The only unsafe code of this crate outside `mmap`.

#![allow(unsafe_code)]

use crate::{Control, WorkerState};

// SAFETY: WorkerState is #[repr(C)], Copy, 'static, made of four u32 with no padding, and
// every bit pattern is a valid value.
unsafe impl aya::Pod for WorkerState {}

// SAFETY: Control is #[repr(C)], Copy, 'static, made of three u32 with no padding, and every
// bit pattern is a valid value.
unsafe impl aya::Pod for Control {}

// SAFETY: Limits is #[repr(C)], Copy, 'static, made of u32, u64 and a ClientKey laid out with
// no padding (56 bytes, checked by a test), and every bit pattern is a valid value.
unsafe impl aya::Pod for crate::client::Limits {}

// SAFETY: ClientKey is #[repr(C)], Copy, 'static, four u32 with no padding; every bit pattern
// is a valid value.
unsafe impl aya::Pod for crate::client::ClientKey {}
