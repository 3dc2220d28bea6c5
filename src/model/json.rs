//! JSON objects read as Go's `encoding/json` reads them into a struct: member by member in the
//! document's order, so that when two keys name one field (keys match case-insensitively, and
//! a key may repeat) the later one wins, as in flanneld. serde_json's `Map` is sorted by key
//! instead, which would let `Network` lose to `network` wherever they stand.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

/// An object's members in the document's order, duplicates kept.
pub(crate) struct InOrder<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for InOrder<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Members<V> {
            type Value = InOrder<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<InOrder<V>, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(InOrder(members))
            }
        }
        d.deserialize_map(Members(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn members_keep_their_order_and_duplicates() {
        let o: InOrder<Value> = serde_json::from_str(r#"{"b":1,"a":2,"B":3,"b":4}"#).unwrap();
        let keys: Vec<(&str, i64)> =
            o.0.iter()
                .map(|(k, v)| (k.as_str(), v.as_i64().unwrap()))
                .collect();
        assert_eq!(keys, [("b", 1), ("a", 2), ("B", 3), ("b", 4)]);
        assert!(serde_json::from_str::<InOrder<Value>>("[1]").is_err());
    }
}
