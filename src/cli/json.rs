//! A one-line JSON object writer for the result line on stdout (no dependency needed for this).

use std::fmt::Write;

#[derive(Debug, Default)]
pub struct JsonLine {
    body: String,
}

impl JsonLine {
    pub fn new() -> Self {
        JsonLine::default()
    }

    fn key(&mut self, key: &str) {
        if !self.body.is_empty() {
            self.body.push(',');
        }
        push_string(&mut self.body, key);
        self.body.push(':');
    }

    pub fn str(mut self, key: &str, value: &str) -> Self {
        self.key(key);
        push_string(&mut self.body, value);
        self
    }

    pub fn uint(mut self, key: &str, value: usize) -> Self {
        self.key(key);
        let _ = write!(self.body, "{value}");
        self
    }

    /// A float; non-finite values (which JSON cannot spell) are written as `null`.
    pub fn float(mut self, key: &str, value: f64) -> Self {
        self.key(key);
        if value.is_finite() {
            let _ = write!(self.body, "{value}");
        } else {
            self.body.push_str("null");
        }
        self
    }

    /// An f32 in its shortest round-trip form.
    pub fn f32(mut self, key: &str, value: f32) -> Self {
        self.key(key);
        if value.is_finite() {
            let _ = write!(self.body, "{value}");
        } else {
            self.body.push_str("null");
        }
        self
    }

    pub fn finish(self) -> String {
        format!("{{{}}}", self.body)
    }
}

fn push_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
