//! Client bytes through kakehi's request path: kawa's parser, `RequestCallbacks`, conversion
//! and partial writes to the backend, pipelining (`lb_proxy::http::memory::drive_request`).
//! Input layout and checks: `src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(case) = kakehi_fuzz::split(data, false) {
        kakehi_fuzz::check_request(&case);
    }
});
