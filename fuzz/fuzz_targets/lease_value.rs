//! Lease values: parsing never panics; an accepted value is written in flannel's form, which
//! reads back to equal attributes and is a fixed point of read-then-write.
#![no_main]

use libfuzzer_sys::fuzz_target;
use linen::model::LeaseAttrs;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(attrs) = LeaseAttrs::from_json(text) else {
        return;
    };
    let written = attrs.to_json();
    assert!(written.starts_with("{\"PublicIP\":\""));
    let again = LeaseAttrs::from_json(&written).expect("written value reads back");
    assert_eq!(again, attrs);
    assert_eq!(again.to_json(), written);
});
