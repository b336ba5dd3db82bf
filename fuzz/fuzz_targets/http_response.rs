//! Backend bytes through kakehi's response path: kawa's parser, `ResponseCallbacks` (HEAD or
//! not, upgrade or not), interim responses, the pipe after a 101, partial writes to the client
//! (`lb_proxy::http::memory::drive_response`). Input layout and checks: `src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(case) = kakehi_fuzz::split(data, true) {
        kakehi_fuzz::check_response(&case);
    }
});
