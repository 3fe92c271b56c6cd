//! Byte sizes as people write them (`4096`, `"64MiB"`, `"1.5GB"`): one parser for the daemon's
//! configuration and tilectl's flags.

const SIZE_UNITS: [(&str, u64); 9] = [
    ("b", 1),
    ("kb", 1000),
    ("mb", 1000 * 1000),
    ("gb", 1000 * 1000 * 1000),
    ("tb", 1000 * 1000 * 1000 * 1000),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
];

/// A count of bytes from an integer or a number with a unit: `B`, decimal `KB`, `MB`, `GB`,
/// `TB` (powers of 1000) or binary `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024), in any case. A
/// fraction is allowed (`"1.5GiB"`) and rounds down to whole bytes. Bare `K`/`M`/`G` are refused
/// because tools disagree on whether they mean 1000 or 1024.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let multiplier = SIZE_UNITS
        .iter()
        .find(|(name, _)| unit.is_empty() || name.eq_ignore_ascii_case(unit))
        .map(|&(_, m)| m)
        .ok_or_else(|| {
            format!(
                "unknown size unit `{unit}` in \"{text}\" (use B, KiB, MiB, GiB, TiB for powers \
                 of 1024 or KB, MB, GB, TB for powers of 1000)"
            )
        })?;
    let bytes = scaled(number, multiplier)
        .ok_or_else(|| format!("\"{text}\" is not a size such as 4096, \"64MiB\" or \"1GB\""))?;
    u64::try_from(bytes).map_err(|_| format!("\"{text}\" is more bytes than fit in 64 bits"))
}

/// `number × multiplier` where `number` is decimal digits with an optional fraction, rounded
/// down; `None` if `number` is not such a number or the product overflows.
pub fn scaled(number: &str, multiplier: u64) -> Option<u128> {
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits_ok(whole) || !digits_ok(frac) || frac.len() > 18 {
        return None;
    }
    let whole: u128 = whole.parse().ok()?;
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    let scale = 10u128.pow(u32::try_from(frac.len()).ok()?);
    let m = u128::from(multiplier);
    whole
        .checked_mul(m)?
        .checked_add(frac_value.checked_mul(m)? / scale)
}
