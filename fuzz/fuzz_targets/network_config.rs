//! The network config JSON: parsing never panics; a config that validates writes back as JSON
//! that parses and validates to the same config (defaults included).
#![no_main]

use libfuzzer_sys::fuzz_target;
use linen::model::{NetworkConfig, NetworkConfigSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = NetworkConfigSpec::from_json(text) else {
        return;
    };
    let Ok(config) = spec.clone().validate() else {
        return;
    };
    let again = NetworkConfig::from_json(&spec.to_json()).expect("written config reads back");
    assert_eq!(again.network, config.network);
    assert_eq!(again.subnet_len, config.subnet_len);
    assert_eq!(again.subnet_min, config.subnet_min);
    assert_eq!(again.subnet_max, config.subnet_max);
    assert_eq!(again.ipv6_network, config.ipv6_network);
    assert_eq!(again.backend, config.backend);
    assert!(config.subnet_min <= config.subnet_max || config.network.is_none());
    if let Some(net) = config.network {
        assert!(net.contains(config.subnet_min) && net.contains(config.subnet_max));
        assert!(config.subnet_len >= net.prefix() + 2 && config.subnet_len <= 30);
    }
});
