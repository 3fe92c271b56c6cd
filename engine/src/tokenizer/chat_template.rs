//! Chat templates rendered the way HF transformers renders them.
//!
//! `PreTrainedTokenizerBase.apply_chat_template` compiles the model's Jinja template in an
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the `loopcontrols`
//! extension, replaces the `tojson` filter with `json.dumps(ensure_ascii=False, …)`, and adds the
//! globals `raise_exception` and `strftime_now`. Templates are Python-flavoured, so string and dict
//! methods (`.strip()`, `.items()`, …) come from minijinja-contrib's pycompat callback.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

/// One turn of a conversation, as the chat template sees it (`message['role']`,
/// `message['content']`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, … — passed through to the template unchecked.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Special-token strings exposed to the template as `bos_token`, `eos_token`, … (HF passes
/// every special token attribute of the tokenizer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

/// The name under which the compiled template lives in its environment.
const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template with HF's Jinja environment around it.
#[derive(Debug)]
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles `source` in an environment configured like HF's.
    pub fn compile(source: String) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source)?;
        Ok(Self { env })
    }

    /// Renders the conversation; `add_generation_prompt` asks the template to open an
    /// assistant turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tokens: &TemplateTokens,
    ) -> Result<String, Error> {
        let template = self.env.get_template(TEMPLATE_NAME)?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        // HF passes only the special tokens that are set: an unset one is undefined, not none.
        let special = [
            ("bos_token", &tokens.bos_token),
            ("eos_token", &tokens.eos_token),
            ("unk_token", &tokens.unk_token),
            ("pad_token", &tokens.pad_token),
        ];
        for (name, token) in special {
            if let Some(token) = token {
                ctx.insert(name, Value::from(token.as_str()));
            }
        }
        template.render(ctx)
    }
}

/// The message a template passed to `raise_exception`, carried as the source of the render
/// error so callers can tell a rejected conversation from a broken template.
#[derive(Debug)]
struct TemplateException(String);

impl fmt::Display for TemplateException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateException {}

/// If `err` was caused by the template calling `raise_exception(msg)`, returns `msg`.
pub(crate) fn raised_message(err: &Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<TemplateException>() {
            return Some(raised.0.clone());
        }
        source = e.source();
    }
    None
}

/// `raise_exception(message)`: templates call it to reject a conversation (bad role order, …).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(
        Error::new(ErrorKind::InvalidOperation, "template raised an exception")
            .with_source(TemplateException(message)),
    )
}

/// `strftime_now(format)`: the current time formatted like Python's `datetime.strftime`.
/// The daemon's clock is read in UTC, the zone servers conventionally run in.
fn strftime_now(format: &str) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    strftime_utc(format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats `unix_secs` (UTC) with the C/Python strftime directives that chat templates use,
/// including glibc's `%-d` style unpadded forms. Unknown directives are copied literally, as
/// glibc does.
pub(crate) fn strftime_utc(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    // 1970-01-01 was a Thursday; index 0 is Monday.
    let weekday = usize::try_from((days + 3).rem_euclid(7)).unwrap_or(0);
    let month_idx = usize::try_from(month - 1).unwrap_or(0);
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |out: &mut String, v: i64, width: usize| {
            // Writing to a String cannot fail.
            let _ = if unpadded {
                write!(out, "{v}")
            } else {
                write!(out, "{v:0width$}")
            };
        };
        match chars.next() {
            Some('Y') => num(&mut out, year, 4),
            Some('y') => num(&mut out, year.rem_euclid(100), 2),
            Some('m') => num(&mut out, month, 2),
            Some('d') => num(&mut out, day, 2),
            Some('e') => {
                let _ = write!(out, "{day:2}");
            }
            Some('H') => num(&mut out, hour, 2),
            Some('I') => num(&mut out, hour12, 2),
            Some('M') => num(&mut out, minute, 2),
            Some('S') => num(&mut out, second, 2),
            Some('j') => num(&mut out, day_of_year, 3),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[month_idx]),
            Some('b' | 'h') => out.push_str(&MONTHS[month_idx][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('u') => num(&mut out, i64::try_from(weekday).unwrap_or(0) + 1, 1),
            Some('w') => num(&mut out, (i64::try_from(weekday).unwrap_or(0) + 1) % 7, 1),
            Some('F') => out.push_str(&strftime_utc("%Y-%m-%d", unix_secs)),
            Some('T') => out.push_str(&strftime_utc("%H:%M:%S", unix_secs)),
            Some('D') => out.push_str(&strftime_utc("%m/%d/%y", unix_secs)),
            Some('R') => out.push_str(&strftime_utc("%H:%M", unix_secs)),
            Some('c') => out.push_str(&strftime_utc("%a %b %e %H:%M:%S %Y", unix_secs)),
            Some('x') => out.push_str(&strftime_utc("%m/%d/%y", unix_secs)),
            Some('X') => out.push_str(&strftime_utc("%H:%M:%S", unix_secs)),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) → days since 1970-01-01; the inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// HF's `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, byte for byte (Python's separators, float repr and escapes), without
/// Jinja's HTML escaping.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_str(), v.as_usize()) {
            (Some(s), _) => Some(s.to_owned()),
            (None, Some(n)) => Some(" ".repeat(n)),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .unwrap_or_default();
            match <[String; 2]>::try_from(parts) {
                Ok([item, key]) => (item, key),
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let mut writer = PyJsonWriter {
        out: String::new(),
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    writer.value(value, 0)?;
    Ok(Value::from(writer.out))
}

/// Serializes a template value the way Python's `json.dumps` does.
struct PyJsonWriter {
    out: String,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJsonWriter {
    fn value(&mut self, value: &Value, depth: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => self.number(value),
            ValueKind::String => {
                let s = value.as_str().unwrap_or_default().to_owned();
                self.string(&s);
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.container('[', ']', depth, items.len(), |w, i| {
                    w.value(&items[i], depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = value
                    .try_iter()?
                    .map(|k| {
                        let v = value.get_item(&k).unwrap_or_default();
                        (Self::key_string(&k), v)
                    })
                    .collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.container('{', '}', depth, entries.len(), |w, i| {
                    let (k, v) = &entries[i];
                    w.string(k);
                    let sep = w.key_sep.clone();
                    w.out.push_str(&sep);
                    w.value(v, depth + 1)
                })?;
            }
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a value of kind {other} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    /// Writes `len` items between `open` and `close`, with Python's newline/indent layout.
    fn container(
        &mut self,
        open: char,
        close: char,
        depth: usize,
        len: usize,
        mut item: impl FnMut(&mut Self, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.out.push(open);
        if len == 0 {
            self.out.push(close);
            return Ok(());
        }
        let indent = self.indent.clone();
        for i in 0..len {
            if i > 0 {
                let sep = self.item_sep.clone();
                self.out.push_str(&sep);
            }
            if let Some(ind) = &indent {
                self.out.push('\n');
                self.out.push_str(&ind.repeat(depth + 1));
            }
            item(self, i)?;
        }
        if let Some(ind) = &indent {
            self.out.push('\n');
            self.out.push_str(&ind.repeat(depth));
        }
        self.out.push(close);
        Ok(())
    }

    fn key_string(key: &Value) -> String {
        match key.kind() {
            ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
            ValueKind::None | ValueKind::Undefined => "null".to_owned(),
            ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_owned(),
            ValueKind::Number if !key.is_integer() => {
                py_float_repr(f64::try_from(key.clone()).unwrap_or(f64::NAN))
            }
            _ => key.to_string(),
        }
    }

    fn number(&mut self, value: &Value) {
        if value.is_integer() {
            self.out.push_str(&value.to_string());
        } else {
            let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
            self.out.push_str(&py_float_repr(f));
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if u32::from(c) < 0x20 || (self.ensure_ascii && u32::from(c) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(self.out, "\\u{unit:04x}");
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// Python's `repr(float)` as `json.dumps` writes it: shortest round-trip digits, positional
/// for exponents in [-4, 16), else `d.ddde±XX`; `NaN` / `Infinity` for the non-finite.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            s + ".0"
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_str(source: &str, ctx: Value) -> Result<String, Error> {
        let t = ChatTemplate::compile(source.to_owned())?;
        t.env.get_template(TEMPLATE_NAME)?.render(ctx)
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        // A struct keeps its field order, like the Python dict literal it stands for.
        #[derive(Serialize)]
        struct X {
            b: serde_json::Value,
            a: &'static str,
            e: std::collections::BTreeMap<String, i32>,
            l: Vec<i32>,
        }
        let x = X {
            b: serde_json::json!([1, 2.5, 1e20, 0.0001, 1e-5, true, null]),
            a: "q\"\\\n\u{1}é<&>",
            e: Default::default(),
            l: Vec::new(),
        };
        let ctx = minijinja::context! { x => Value::from_serialize(x) };
        // Outputs of Python 3: json.dumps(x, ensure_ascii=False, ...).
        assert_eq!(
            render_str("{{ x | tojson }}", ctx.clone()).unwrap(),
            r#"{"b": [1, 2.5, 1e+20, 0.0001, 1e-05, true, null], "a": "q\"\\\n\u0001é<&>", "e": {}, "l": []}"#
        );
        assert_eq!(
            render_str("{{ x.b[:2] | tojson(indent=2) }}", ctx.clone()).unwrap(),
            "[\n  1,\n  2.5\n]"
        );
        assert_eq!(
            render_str(
                "{{ x | tojson(sort_keys=true, separators=[',', ':']) }}",
                ctx
            )
            .unwrap(),
            r#"{"a":"q\"\\\n\u0001é<&>","b":[1,2.5,1e+20,0.0001,1e-05,true,null],"e":{},"l":[]}"#
        );
        let ctx = minijinja::context! { s => "é😀" };
        assert_eq!(
            render_str("{{ s | tojson(ensure_ascii=true) }}", ctx).unwrap(),
            r#""\u00e9\ud83d\ude00""#
        );
    }

    #[test]
    fn raise_exception_message_is_recoverable() {
        let err = render_str(
            "{{ raise_exception('roles must alternate') }}",
            Value::from(()),
        )
        .unwrap_err();
        assert_eq!(
            raised_message(&err).as_deref(),
            Some("roles must alternate")
        );
        let other = render_str("{{ 1 + 'a' }}", Value::from(())).unwrap_err();
        assert_eq!(raised_message(&other), None);
    }

    #[test]
    fn strftime_formats_like_python() {
        // 2024-02-29T13:05:09Z; Python: datetime(2024,2,29,13,5,9).strftime(...)
        let t = 1_709_211_909;
        assert_eq!(
            strftime_utc("%d %b %Y %H:%M:%S %A %j %I%p %-d/%-m %%", t),
            "29 Feb 2024 13:05:09 Thursday 060 01PM 29/2 %"
        );
        assert_eq!(
            strftime_utc("%B %e, %y %F %Q", 0),
            "January  1, 70 1970-01-01 %Q"
        );
        assert_eq!(strftime_now("%Y").len(), 4);
    }

    #[test]
    fn python_methods_and_whitespace_control() {
        let src = "{% for m in messages %}\n  {{ m.content.strip() | upper }}|\n{% endfor %}\n";
        let ctx = minijinja::context! { messages => vec![
            Value::from_serialize(ChatMessage::new("user", "  hi ")),
        ] };
        // trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before
        // one; the trailing newline of the template is dropped.
        assert_eq!(render_str(src, ctx).unwrap(), "  HI|\n");
    }

    #[test]
    fn loop_controls_are_available() {
        let src = "{% for i in [1,2,3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}";
        assert_eq!(render_str(src, Value::from(())).unwrap(), "1");
    }
}
