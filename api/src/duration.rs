//! Durations as users write them in YAML (`250ms`, `2s`, `1m`), kept as a
//! [`std::time::Duration`] and written back in the same human form.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration that (de)serializes as text such as `5s` or `1m 30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_millis(ms: u64) -> Self {
        HumanDuration(Duration::from_millis(ms))
    }

    pub const fn from_secs(secs: u64) -> Self {
        HumanDuration(Duration::from_secs(secs))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?}: {e} (examples: 250ms, 2s, 1m)"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_human_text() {
        let d: HumanDuration = serde_json::from_str("\"1m 30s\"").unwrap();
        assert_eq!(d.get(), Duration::from_secs(90));
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1m 30s\"");
        let err = serde_json::from_str::<HumanDuration>("\"5 parsecs\"").unwrap_err();
        assert!(err.to_string().contains("invalid duration"), "{err}");
    }
}
