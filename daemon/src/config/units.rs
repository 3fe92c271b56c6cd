//! Value types of the config file that people write by hand: byte sizes (`"64MiB"`), durations
//! (`"10m"`), octal file modes (`"0660"`), an optional socket address and a list of names. Each
//! accepts what an operator naturally writes and serializes back to the same short form, so that
//! `tileflowd config default` prints values a person would type.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A count of bytes, written as an integer or as a number with a unit: `B`, decimal `KB`, `MB`,
/// `GB`, `TB` (powers of 1000) or binary `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024), in any case.
/// A fraction is allowed (`"1.5GiB"`) and rounds down to whole bytes. Bare `K`/`M`/`G` are
/// refused because tools disagree on whether they mean 1000 or 1024.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The number of bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<ByteSize, String> {
        tileflow_client::units::parse_byte_size(text).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The largest unit that divides exactly, binary first: 1048576 is "1MiB", 1000000 is "1MB".
        let units = [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
            ("TB", 1000 * 1000 * 1000 * 1000),
            ("GB", 1000 * 1000 * 1000),
            ("MB", 1000 * 1000),
            ("KB", 1000),
        ];
        match units
            .iter()
            .find(|(_, m)| self.0 != 0 && self.0.is_multiple_of(*m))
        {
            Some((name, m)) => write!(f, "{}{name}", self.0 / m),
            None => write!(f, "{}B", self.0),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes, or a string such as \"64MiB\" or \"1GB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("a size cannot be negative ({v})")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A span of time, written as whole seconds (an integer, or a string of digits) or as a string of
/// number-unit pairs such as `"30s"`, `"10m"`, `"1h30m"`, `"1.5s"` or `"250ms"`. Units: `ms`,
/// `s`, `m` (minutes), `h`, `d`, lower case (upper-case `M` would read as months elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanDuration(pub Duration);

const DURATION_UNITS: [(&str, u64); 9] = [
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("sec", 1_000_000_000),
    ("m", 60_000_000_000),
    ("min", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("hr", 3_600_000_000_000),
    ("d", 86_400_000_000_000),
    ("day", 86_400_000_000_000),
];

impl HumanDuration {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<HumanDuration, String> {
        let bad = || {
            format!(
                "\"{text}\" is not a duration such as 30 (seconds), \"30s\", \"10m\" or \"1h30m\""
            )
        };
        let t = text.trim();
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            let secs: u64 = t.parse().map_err(|_| bad())?;
            return Ok(HumanDuration(Duration::from_secs(secs)));
        }
        let mut nanos: u128 = 0;
        let mut rest = t;
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            let unit_len = rest[num_end..]
                .find(|c: char| !c.is_ascii_alphabetic())
                .unwrap_or(rest.len() - num_end);
            let (number, unit) = (&rest[..num_end], &rest[num_end..num_end + unit_len]);
            let per = DURATION_UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|&(_, n)| n)
                .ok_or_else(|| {
                    format!("unknown duration unit `{unit}` in \"{text}\" (use ms, s, m, h or d)")
                })?;
            nanos = tileflow_client::units::scaled(number, per)
                .and_then(|n| nanos.checked_add(n))
                .ok_or_else(bad)?;
            rest = rest[num_end + unit_len..].trim_start();
        }
        let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| bad())?;
        let sub = u32::try_from(nanos % 1_000_000_000).map_err(|_| bad())?;
        Ok(HumanDuration(Duration::new(secs, sub)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis();
        if ms == 0 && !self.0.is_zero() {
            // Below a millisecond: not something a person configures; keep it exact in seconds.
            return write!(f, "{}s", self.0.as_secs_f64());
        }
        if ms == 0 {
            return f.write_str("0s");
        }
        for (name, per) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms >= per {
                write!(f, "{}{name}", ms / per)?;
                ms %= per;
            }
        }
        if ms > 0 {
            write!(f, "{ms}ms")?;
        }
        Ok(())
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("seconds, or a string such as \"30s\", \"10m\" or \"1h30m\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Ok(HumanDuration(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                u64::try_from(v)
                    .map(|s| HumanDuration(Duration::from_secs(s)))
                    .map_err(|_| E::custom(format!("a duration cannot be negative ({v})")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Permission bits of a file, written as an octal string (`"0660"`, `"660"`, `"0o660"`). Integers
/// are refused: TOML's `0o660` and a mistaken decimal `660` cannot be told apart once parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl FileMode {
    /// The permission bits.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl FromStr for FileMode {
    type Err = String;

    fn from_str(text: &str) -> Result<FileMode, String> {
        let t = text.trim();
        let digits = t.strip_prefix("0o").unwrap_or(t);
        match u32::from_str_radix(digits, 8) {
            Ok(bits) if !digits.is_empty() && bits <= 0o7777 => Ok(FileMode(bits)),
            _ => Err(format!(
                "\"{text}\" is not an octal file mode such as \"0660\""
            )),
        }
    }
}

impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl Serialize for FileMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FileMode, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = FileMode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an octal file mode such as \"0660\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<FileMode, E> {
                Err(E::custom(format!(
                    "{v} is ambiguous as a file mode; write it as an octal string such as \"0660\""
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<FileMode, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FileMode, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// An optional TCP listen address: `""` for none, else `IP:port` (`127.0.0.1:9464`,
/// `[::1]:9464`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ListenAddr(pub Option<SocketAddr>);

impl ListenAddr {
    /// The address, if one is configured.
    pub fn get(self) -> Option<SocketAddr> {
        self.0
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => Ok(()),
        }
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ListenAddr, D::Error> {
        let text = String::deserialize(d)?;
        let t = text.trim();
        if t.is_empty() {
            return Ok(ListenAddr(None));
        }
        t.parse().map(|a| ListenAddr(Some(a))).map_err(|_| {
            de::Error::custom(format!(
                "\"{text}\" is not an IP:port address such as \"127.0.0.1:9464\" or \"[::1]:9464\""
            ))
        })
    }
}

/// Deserializes a list of names from a TOML array or from one comma-separated string (the
/// natural form in an environment variable: `TILEFLOW_MODELS__PRELOAD=olmoe,qwen3`).
pub(crate) fn name_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of names, or one string of comma-separated names")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(name) = seq.next_element::<String>()? {
                out.push(name);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(s: &str) -> Result<u64, String> {
        s.parse::<ByteSize>().map(ByteSize::bytes)
    }

    fn dur(s: &str) -> Result<Duration, String> {
        s.parse::<HumanDuration>().map(HumanDuration::get)
    }

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(size("0"), Ok(0));
        assert_eq!(size("12B"), Ok(12));
        assert_eq!(size("1KiB"), Ok(1024));
        assert_eq!(size("64MiB"), Ok(64 << 20));
        assert_eq!(size("64 mib"), Ok(64 << 20));
        assert_eq!(size("1GB"), Ok(1_000_000_000));
        assert_eq!(size("2TiB"), Ok(2 << 40));
        assert_eq!(size("1.5GiB"), Ok(3 << 29));
        assert_eq!(size("0.5KB"), Ok(500));
        assert_eq!(size("0.1KiB"), Ok(102));
        assert!(size("1M").unwrap_err().contains("unknown size unit `M`"));
        assert!(size("").is_err());
        assert!(size("MiB").is_err());
        assert!(size("-1MiB").is_err());
        assert!(size("1.2.3MiB").is_err());
        assert!(size("99999999999TiB").unwrap_err().contains("64 bits"));
    }

    #[test]
    fn sizes_print_in_the_largest_exact_unit() {
        for (bytes, text) in [
            (1 << 20, "1MiB"),
            (64 << 20, "64MiB"),
            (1536, "1536B"),
            (3 << 29, "1536MiB"),
            (1_000_000, "1MB"),
            (1001, "1001B"),
            (0, "0B"),
        ] {
            assert_eq!(ByteSize(bytes).to_string(), text);
            assert_eq!(size(text), Ok(bytes), "{text} round trip");
        }
    }

    #[test]
    fn durations_parse_seconds_and_units() {
        assert_eq!(dur("600"), Ok(Duration::from_secs(600)));
        assert_eq!(dur("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(dur("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(dur("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(dur("1h 30m 5s"), Ok(Duration::from_secs(5405)));
        assert_eq!(dur("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(dur("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(dur("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(dur("0s"), Ok(Duration::ZERO));
        assert!(dur("10M")
            .unwrap_err()
            .contains("unknown duration unit `M`"));
        assert!(dur("10").is_ok());
        assert!(dur("").is_err());
        assert!(dur("s").is_err());
        assert!(dur("-5s").is_err());
        assert!(dur("5 s x").is_err());
    }

    #[test]
    fn durations_print_compactly_and_round_trip() {
        for (d, text) in [
            (Duration::from_secs(600), "10m"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(5405), "1h30m5s"),
            (Duration::from_millis(1500), "1s500ms"),
            (Duration::ZERO, "0s"),
            (Duration::from_secs(90_000), "1d1h"),
        ] {
            assert_eq!(HumanDuration(d).to_string(), text);
            assert_eq!(dur(text), Ok(d), "{text} round trip");
        }
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!("0660".parse::<FileMode>(), Ok(FileMode(0o660)));
        assert_eq!("660".parse::<FileMode>(), Ok(FileMode(0o660)));
        assert_eq!("0o600".parse::<FileMode>(), Ok(FileMode(0o600)));
        assert!("0680".parse::<FileMode>().is_err());
        assert!("".parse::<FileMode>().is_err());
        assert!("77777".parse::<FileMode>().is_err());
        assert_eq!(FileMode(0o660).to_string(), "0660");
    }

    #[derive(Debug, Deserialize)]
    struct Probe {
        mode: Option<FileMode>,
        size: Option<ByteSize>,
        timeout: Option<HumanDuration>,
        listen: Option<ListenAddr>,
        #[serde(default, deserialize_with = "name_list")]
        names: Vec<String>,
    }

    #[test]
    fn toml_integers_and_strings_both_work() {
        let p: Probe = toml::from_str(
            "mode = \"0640\"\nsize = 1024\ntimeout = 90\nlisten = \"[::1]:9464\"\nnames = \"a, b\"",
        )
        .unwrap();
        assert_eq!(p.mode, Some(FileMode(0o640)));
        assert_eq!(p.size, Some(ByteSize(1024)));
        assert_eq!(p.timeout, Some(HumanDuration(Duration::from_secs(90))));
        assert_eq!(
            p.listen.and_then(ListenAddr::get),
            "[::1]:9464".parse().ok()
        );
        assert_eq!(p.names, ["a", "b"]);
        let p: Probe = toml::from_str("names = [\"x\"]\nlisten = \"\"").unwrap();
        assert_eq!(p.names, ["x"]);
        assert_eq!(p.listen, Some(ListenAddr(None)));
        for int_mode in ["660", "0o660"] {
            let err = toml::from_str::<Probe>(&format!("mode = {int_mode}")).unwrap_err();
            assert!(err.to_string().contains("octal string"), "{err}");
        }
        let err = toml::from_str::<Probe>("size = -1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("negative"), "{err}");
        let err = toml::from_str::<Probe>("listen = \"localhost:1\"").unwrap_err();
        assert!(err.to_string().contains("IP:port"), "{err}");
    }
}
