//! Subnet keys: parsing never panics, and an accepted key prints back to text that parses to
//! the same key (the printed form is canonical: parsing it and printing again is identical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use linen::model::SubnetKey;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(key) = SubnetKey::parse(text) else {
        return;
    };
    assert!(key.ipv4().is_some() || key.ipv6().is_some());
    let printed = key.to_string();
    let again = SubnetKey::parse(&printed).expect("printed key parses");
    assert_eq!(again, key);
    assert_eq!(again.to_string(), printed);
    if let Some(n) = key.ipv4() {
        assert_eq!(n.ip(), n.network(), "host bits are zero");
        assert!(n.prefix() <= 31);
    }
});
