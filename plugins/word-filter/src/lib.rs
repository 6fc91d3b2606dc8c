//! A message filter that denies messages containing listed words and masks others.
//!
//! Config (`[plugins.config]` in the gateway's config.toml):
//! ```toml
//! deny = ["spam", "scam"]   # any of these in any string of the message: deny
//! mask = ["darn"]           # replaced by asterisks of the same length: rewrite
//! ```
//! Matching is case-insensitive (ASCII) on every string value inside the message's JSON.
//!
//! It exports both filter interfaces: `batch-filter`, which a host calls once per burst of
//! messages, and `filter`, for hosts that predate it. One function decides for both.

use std::cell::RefCell;

use serde::Deserialize;
use serde_json::Value;

wit_bindgen::generate!({
    inline: "
        package example:word-filter;
        world word-filter {
            include switchboard:policy/message-filter@0.1.0;
            include switchboard:policy/batch-message-filter@0.1.0;
        }
    ",
    path: "../../wit",
    world: "example:word-filter/word-filter",
    generate_all,
});

use exports::switchboard::policy::batch_filter::{self, Batch, Span};
use exports::switchboard::policy::filter::{self, Message};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    mask: Vec<String>,
}

impl Config {
    /// Which bytes may start a match in the raw JSON text: the first byte of every listed
    /// word in either ASCII case, and the backslash of a `\u` escape that could hide one.
    fn starts(&self) -> [bool; 256] {
        let mut starts = [false; 256];
        for w in self.deny.iter().chain(&self.mask) {
            let b = w.as_bytes()[0];
            starts[b.to_ascii_lowercase() as usize] = true;
            starts[b.to_ascii_uppercase() as usize] = true;
        }
        starts[b'\\' as usize] = true;
        starts
    }
}

/// The configuration, and the bytes that can start a match in it.
struct Loaded {
    config: Config,
    starts: [bool; 256],
}

thread_local! {
    static CONFIG: RefCell<Loaded> = RefCell::new(Loaded { config: Config::default(), starts: [false; 256] });
}

struct WordFilter;

/// Finds `needle` in `hay` ignoring ASCII case; returns byte offsets of every match.
fn find_all(hay: &str, needle: &str) -> Vec<usize> {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    if n.is_empty() || n.len() > h.len() {
        return Vec::new();
    }
    let first = n[0].to_ascii_lowercase();
    (0..=h.len() - n.len())
        .filter(|&i| h[i].to_ascii_lowercase() == first && h[i..i + n.len()].eq_ignore_ascii_case(n))
        .collect()
}

/// Whether the raw JSON text `hay` may hold a listed word in one of its strings: one of the
/// words appears in it (ignoring ASCII case), or a `\u` escape does, which could spell one.
/// One pass over the text, comparing words only where `starts` says one could begin.
fn may_match(hay: &[u8], loaded: &Loaded) -> bool {
    let words = loaded.config.deny.iter().chain(&loaded.config.mask);
    (0..hay.len()).filter(|&i| loaded.starts[hay[i] as usize]).any(|i| {
        let rest = &hay[i..];
        rest.starts_with(b"\\u")
            || words.clone().any(|w| rest.len() >= w.len() && rest[..w.len()].eq_ignore_ascii_case(w.as_bytes()))
    })
}

/// Visits every string in `v`; `f` may change it and returns whether it did.
fn visit_strings(v: &mut Value, f: &mut impl FnMut(&mut String) -> bool) -> bool {
    match v {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter_mut().fold(false, |changed, item| visit_strings(item, f) | changed),
        Value::Object(map) => map.values_mut().fold(false, |changed, item| visit_strings(item, f) | changed),
        _ => false,
    }
}

/// What happens to a message whose body is the JSON text `data`.
enum Verdict {
    Allow,
    Deny(String),
    Rewrite(String),
}

fn init(config: String) -> Result<(), String> {
    let parsed: Config = serde_json::from_str(&config).map_err(|e| format!("word-filter config: {e}"))?;
    if parsed.deny.iter().chain(&parsed.mask).any(|w| w.is_empty()) {
        return Err("word-filter config: words must not be empty".into());
    }
    let starts = parsed.starts();
    CONFIG.with(|c| *c.borrow_mut() = Loaded { config: parsed, starts });
    Ok(())
}

fn decide(data: &str) -> Verdict {
    // Fast path: when no listed word appears anywhere in the raw JSON text (and no
    // \u escape could be hiding one), no string in it can contain one either.
    if !CONFIG.with(|c| may_match(data.as_bytes(), &c.borrow())) {
        return Verdict::Allow;
    }
    let Ok(mut data) = serde_json::from_str::<Value>(data) else {
        return Verdict::Deny("message is not JSON".into());
    };
    CONFIG.with(|c| {
        let config = &c.borrow().config;
        let mut denied = None;
        visit_strings(&mut data, &mut |s| {
            if denied.is_none() {
                denied = config.deny.iter().find(|w| !find_all(s, w).is_empty()).cloned();
            }
            false
        });
        if let Some(word) = denied {
            return Verdict::Deny(format!("message contains a blocked word ({word})"));
        }
        let changed = visit_strings(&mut data, &mut |s| {
            let mut changed = false;
            for word in &config.mask {
                for at in find_all(s, word) {
                    // Every match is ASCII-case-equal to an ASCII-or-not word of the
                    // same byte length, so the range sits on char boundaries.
                    s.replace_range(at..at + word.len(), &"*".repeat(word.len()));
                    changed = true;
                }
            }
            changed
        });
        if changed {
            Verdict::Rewrite(data.to_string())
        } else {
            Verdict::Allow
        }
    })
}

impl filter::Guest for WordFilter {
    fn init(config: String) -> Result<(), String> {
        init(config)
    }

    fn filter(message: Message) -> filter::Verdict {
        match decide(&message.data) {
            Verdict::Allow => filter::Verdict::Allow,
            Verdict::Deny(reason) => filter::Verdict::Deny(reason),
            Verdict::Rewrite(data) => filter::Verdict::Rewrite(data),
        }
    }
}

impl batch_filter::Guest for WordFilter {
    fn init(config: String) -> Result<(), String> {
        init(config)
    }

    fn filter_batch(batch: Batch) -> Vec<batch_filter::Verdict> {
        let text = |s: Span| &batch.text[s.offset as usize..][..s.len as usize];
        batch
            .messages
            .iter()
            .map(|m| match decide(text(m.data)) {
                Verdict::Allow => batch_filter::Verdict::Allow,
                Verdict::Deny(reason) => batch_filter::Verdict::Deny(reason),
                Verdict::Rewrite(data) => batch_filter::Verdict::Rewrite(data),
            })
            .collect()
    }
}

export!(WordFilter);
