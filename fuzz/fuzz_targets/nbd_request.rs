#![no_main]
use libfuzzer_sys::fuzz_target;

use chunkvol::nbd::proto;

fuzz_target!(|data: &[u8]| {
    let _ = chunkvol::nbd::parse_request(data);
    let _ = proto::parse_option_header(data);
    let _ = proto::parse_client_flags(data);
    let _ = proto::parse_info_request(data);
    let _ = proto::parse_meta_context_request(data);
    let _ = proto::parse_string(data);
});
