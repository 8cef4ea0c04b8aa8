#![no_main]
//! `sglp_engine::fuzz_entry::torch`: see that function for what the input is and what is asserted.

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: sglp_engine::fuzz_entry::CappedAlloc = sglp_engine::fuzz_entry::CappedAlloc;

fuzz_target!(|data: &[u8]| {
    sglp_engine::fuzz_entry::fuzz_main(sglp_engine::fuzz_entry::torch, data)
});
